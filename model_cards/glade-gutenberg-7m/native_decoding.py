"""A decoding step in C (`native_step.c`), built for this machine's CPU on first use: the route nearest the floor.

Inductor's matrix-vector reductions stream the weights at about a third of memory bandwidth on AVX2 (one dependent
sum per output row), and a compiled step spends more again between its kernels. `native_step.c` does the whole step,
embeddings to logits, in one OpenMP region, streaming each weight row once into four independent sums. It is compiled
with the system's C compiler (`CC`, default `cc`) for the CPU it runs on (`-march=native`) and cached by source, flags
and CPU in `GLADE_CACHE` (default ~/.cache/glade); a machine without a compiler, or a model it does not cover, keeps
the compiled step. Weights are read in place (fp32), or as int8 copies with one scale per output row (`int8=True`):
a quarter of the bytes to stream, the products summed in fp32.
"""

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, StaticCache

from .hardware import cpu_features

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_step.c")
COMPILE_FLAGS = ("-O3", "-march=native", "-std=gnu11", "-ffp-contract=fast", "-shared", "-fPIC")
NATIVE_WEIGHTS = ("fp32", "int8")
NORMS = {"layernorm": 0, "rmsnorm": 1}
ACTIVATIONS = {"gelu_new": 0, "gelu": 1, "relu2": 2, "swiglu": 3}
# The modules the step reads as plain weights: anything else in their place (a LoRA, a quantized layer) is refused.
PROJECTIONS = ("c_attn", "c_proj", "c_fc", "c_gate", "lm_head")


class CLinear(ctypes.Structure):
    _fields_ = [
        ("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("out", ctypes.c_int32), ("in_", ctypes.c_int32),
    ]


class CNorm(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class CLayer(ctypes.Structure):
    _fields_ = [
        ("ln_1", CNorm), ("ln_2", CNorm),
        ("c_attn", CLinear), ("attn_proj", CLinear), ("c_gate", CLinear), ("c_fc", CLinear), ("mlp_proj", CLinear),
        ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p),
    ]


class CModel(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int32) for name in (
            "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "n_inner", "vocab_size", "rotary_dim",
            "cache_length", "norm", "activation", "int8", "embedding_norm",
        )),
        ("eps", ctypes.c_float), ("softcap", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("wte", "wpe", "cos", "sin")),
        ("ln_emb", CNorm), ("ln_f", CNorm), ("head", CLinear), ("layers", ctypes.POINTER(CLayer)),
        *((name, ctypes.c_void_p) for name in ("x", "h", "qkv", "att", "ff", "gate", "scores")),
    ]


def unsupported(model: PreTrainedModel) -> str | None:
    """Why the native step cannot run `model`, or None if it can."""
    config = model.config
    if getattr(config, "model_type", None) != "glade":
        return "not a Glade model"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return f"runs fp32 on CPU, the model is {model.dtype} on {model.device.type}"
    if config.qk_norm or config.residual_lambdas or config.value_embeddings:
        return "QK-norm, residual lambdas and value embeddings are not in the native step"
    if config.positions == "rotary" and config.rope_parameters.get("rope_type") in ("dynamic", "longrope"):
        return f"rope type {config.rope_parameters['rope_type']!r} changes with the sequence length"
    projections = [module for name, module in model.named_modules() if name.endswith(PROJECTIONS)]
    if any(type(module) is not nn.Linear for module in projections):
        return "a projection is wrapped or replaced (adapters, quantization)"
    return None


def unavailable(model: PreTrainedModel) -> str | None:
    """Why the native step cannot run `model` on this machine, or None if it can."""
    reason = unsupported(model)
    if reason is None and library() is None:
        reason = f"the C step could not be built here ({_library_error})"
    return reason


_library: ctypes.CDLL | None = None
_library_error: str | None = None
_library_lock = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The compiled step, built on first use; None (with the reason logged once) where it cannot be built."""
    global _library, _library_error
    with _library_lock:
        if _library is None and _library_error is None:
            if not SOURCE.exists():  # the Hub's remote-code copy of this module comes without the C file
                _library_error = f"{SOURCE.name} is not beside {Path(__file__).name}"
                logger.info("Glade's native decoding step is not available: %s", _library_error)
                return None
            try:
                _library = load(build())
            except OSError as error:
                _library_error = str(error)
                logger.warning(
                    "Glade's native decoding step could not be built (%s); decoding uses the compiled step", error
                )
        return _library


def build() -> Path:
    """The shared library for this source, compiler and CPU, compiled once into the cache."""
    compiler = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), " ".join(COMPILE_FLAGS).encode(), platform.machine().encode(),
                    " ".join(sorted(cpu_features())).encode()])
    ).hexdigest()[:20]
    cache = Path(os.environ.get("GLADE_CACHE", Path.home() / ".cache" / "glade")) / "native"
    target = cache / f"native_step-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / target.name
        # OpenMP where the compiler has it (Apple's clang does not): the library then shares torch's OpenMP runtime.
        for openmp in (["-fopenmp"], []):
            result = subprocess.run(
                [compiler, *COMPILE_FLAGS, *openmp, str(SOURCE), "-o", str(built), "-lm"],
                capture_output=True, text=True, check=False,
            )
            if result.returncode == 0:
                break
        else:
            raise OSError(f"{compiler} failed to compile {SOURCE.name}: {result.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: a concurrent build or a crash never leaves half a library
    return target


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.glade_step.argtypes = [
        ctypes.POINTER(CModel), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int,
    ]
    lib.glade_step.restype = None
    return lib


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (int8 weight, fp32 scale) with weight ~ int8 * scale."""
    scale = weight.detach().abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return (weight.detach() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale.float()


def int8_fake_quantized(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the int8 step computes with it."""
    quantized, scale = quantize_int8(weight)
    return quantized.float() * scale[:, None]


def int8_twin(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of `model` that computes what the int8 step does, in fp32: every projection of the blocks and the head
    rounded to int8 per row (a tied head is untied: the step embeds with the fp32 table). For measuring what int8
    costs in quality, with any evaluation that takes a model."""
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        for module in twin.transformer.h.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(int8_fake_quantized(module.weight))
    twin.lm_head.weight = nn.Parameter(int8_fake_quantized(model.lm_head.weight))
    return twin


class NativeStep:
    """`glade_step` bound to one model and batch size. `bind(cache)` points it at a static cache whose prompt the model
    filled (or `prompt` runs the prompt itself); then each `logits_after` computes one position's logits in C and
    writes its keys and values into the cache's next slot. fp32 weights are read where they are; int8 ones are
    quantized copies, which the caller rebuilds when `signature` no longer matches the model's weights."""

    def __init__(self, lib: ctypes.CDLL, model: PreTrainedModel, batch: int, length: int, int8: bool = False):
        config = model.config
        self.lib, self.batch, self.int8 = lib, batch, int8
        self.signature = weights_signature(model)
        self.keep: list[object] = []  # every tensor (and array) a pointer in `self.model` points into
        transformer = model.transformer
        head_dim = config.n_embd // config.n_head
        self.layers = (CLayer * config.n_layer)()
        for index, block in enumerate(transformer.h):
            mlp = block.mlp
            self.layers[index] = CLayer(
                ln_1=self.norm(block.ln_1), ln_2=self.norm(block.ln_2),
                c_attn=self.linear(block.attn.c_attn), attn_proj=self.linear(block.attn.c_proj),
                c_gate=self.linear(mlp.c_gate) if hasattr(mlp, "c_gate") else CLinear(),
                c_fc=self.linear(mlp.c_fc), mlp_proj=self.linear(mlp.c_proj),
            )
        rotary_dim = cos = sin = 0
        if config.positions == "rotary":
            with torch.no_grad():
                positions = torch.arange(max(config.n_positions, config.max_position_embeddings))[None]
                cos, sin = transformer.rotary_emb(transformer.wte.weight[:1], positions)
            rotary_dim = cos.shape[-1]
            cos, sin = self.pointer(cos[0].float().contiguous()), self.pointer(sin[0].float().contiguous())
        width = (config.n_head + 2 * config.n_kv_head) * head_dim
        scratch = {
            "x": config.n_embd, "h": config.n_embd, "qkv": width, "att": config.n_embd, "ff": config.n_inner,
            "gate": config.n_inner, "scores": config.n_head * length,
        }
        self.model = CModel(
            n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head, n_kv_head=config.n_kv_head,
            head_dim=head_dim, n_inner=config.n_inner, vocab_size=config.vocab_size, rotary_dim=rotary_dim,
            cache_length=length, norm=NORMS[config.norm], activation=ACTIVATIONS[config.activation_function],
            int8=int(int8), embedding_norm=int(config.embedding_norm), eps=config.layer_norm_epsilon,
            softcap=config.logit_softcap or 0.0, wte=self.pointer(transformer.wte.weight),
            wpe=self.pointer(transformer.wpe.weight) if config.positions == "learned" else 0, cos=cos, sin=sin,
            ln_emb=self.norm(transformer.ln_emb) if config.embedding_norm else CNorm(),
            ln_f=self.norm(transformer.ln_f), head=self.linear(model.lm_head), layers=self.layers,
            **{name: self.pointer(torch.empty(batch * size)) for name, size in scratch.items()},
        )
        self.logits = torch.empty(batch, config.vocab_size)

    def pointer(self, tensor: torch.Tensor | None) -> int:
        if tensor is None:
            return 0
        tensor = tensor.detach()
        if not tensor.is_contiguous() or tensor.dtype not in (torch.float32, torch.int8):
            tensor = tensor.float().contiguous()
        self.keep.append(tensor)
        return tensor.data_ptr()

    def norm(self, module: nn.Module) -> CNorm:
        return CNorm(
            weight=self.pointer(getattr(module, "weight", None)), bias=self.pointer(getattr(module, "bias", None))
        )

    def linear(self, module: nn.Linear) -> CLinear:
        weight, scale = module.weight, None
        if self.int8:
            weight, scale = quantize_int8(weight)
        return CLinear(
            weight=self.pointer(weight), scale=self.pointer(scale), bias=self.pointer(module.bias),
            out=module.out_features, in_=module.in_features,
        )

    def bind(self, cache: StaticCache) -> None:
        """Point the step at `cache`, whose next free slot follows the positions it holds. The step counts slots
        itself (advancing the cache's tensor counters would cost more than a small model's attention); the cache is
        for this step alone until it is reset."""
        self.slot = int(cache.layers[0].cumulative_length)
        self.length = cache.layers[0].max_cache_len
        for layer, cached in zip(self.layers, cache.layers):
            layer.keys, layer.values = cached.keys.data_ptr(), cached.values.data_ptr()

    def prompt(self, cache: StaticCache, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run left-padded `input_ids` [batch, prompt] through the step one position at a time into the empty `cache`
        (so that int8 weights compute the prompt's keys and values too); the last position's logits [batch, vocab].
        `mask` is [batch, cache length], the prompt's attention mask first. The ids are not checked here."""
        batch, prompt_length = input_ids.shape
        cache.early_initialization(batch, self.model.n_kv_head, self.model.head_dim, torch.float32, torch.device("cpu"))
        self.bind(cache)
        positions = (mask[:, :prompt_length].long().cumsum(-1) - 1).clamp(min=0)
        for slot in range(prompt_length):
            logits = self.logits_after(input_ids[:, slot : slot + 1], positions[:, slot : slot + 1], mask)
        return logits

    def logits_after(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch, vocab] logits after `tokens` [batch, 1] at `positions` [batch, 1], attending where `mask`
        [batch, cache length] is nonzero; their keys and values fill the cache's next slot."""
        if self.slot >= self.length:
            raise ValueError(f"the cache's {self.length} positions are full")
        tokens, positions, mask = (tensor.long().contiguous() for tensor in (tokens, positions, mask))
        self.lib.glade_step(
            ctypes.byref(self.model), tokens.data_ptr(), positions.data_ptr(), mask.data_ptr(), self.slot, self.batch,
            self.logits.data_ptr(), torch.get_num_threads(),
        )
        self.slot += 1
        return self.logits


def weights_signature(model: PreTrainedModel) -> tuple[tuple[int, int], ...]:
    """Where each weight lives and how often it was changed in place: a quantized copy is stale when this changes."""
    return tuple((parameter.data_ptr(), parameter._version) for parameter in model.parameters())
