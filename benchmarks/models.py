"""The contestants: transformers' GPT-2, Glade and a nanoGPT-style model, built at one shape with the same weights.

GPT-2 is initialised from a seed; Glade receives its weights through `glade.conversion` (a transpose of the Conv1D
projections) and nanoGPT receives Glade's state dict (same names, same layout). All three compute the same function, so
the benchmark compares implementations, never models.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from glade import GladeForCausalLM
from glade.conversion import glade_config_from_gpt2, gpt2_to_glade
from glade.decoding import CompiledDecoder
from nanogpt import NanoGPT


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int
    batch: int
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len

    def training_flops_per_token(self) -> int:
        """Matmul FLOPs per trained token (forward + backward = 3 x forward), as in the PaLM paper's MFU: every
        projection and the output head (6 per weight), plus attention scores and mixing counted without the causal
        half-saving (12 * n_layer * seq_len * n_embd). Element-wise work is not counted."""
        weights = self.n_layer * 12 * self.n_embd**2 + self.vocab_size * self.n_embd
        return 6 * weights + 12 * self.n_layer * self.seq_len * self.n_embd

    def as_dict(self) -> dict:
        return asdict(self)


# The shapes: the 6-layer/384-wide model at batch 8 x 256, and GPT-2 124M at batch 4 x 512.
SHAPES = {
    "small": Shape(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, n_positions=512, batch=8, seq_len=256),
    "124m": Shape(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, batch=4, seq_len=512),
}
# Same keys, CI-sized: the quick run exercises every code path in seconds.
QUICK_SHAPES = {
    "small": Shape(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=128, batch=2, seq_len=32),
    "124m": Shape(n_layer=2, n_embd=96, n_head=4, vocab_size=1024, n_positions=128, batch=2, seq_len=64),
}


def gpt2_config(shape: Shape) -> GPT2Config:
    # No end-of-text id: greedy decoding of random weights must run to its full length in every contestant.
    special = shape.vocab_size - 1
    return GPT2Config(
        vocab_size=shape.vocab_size, n_positions=shape.n_positions, n_embd=shape.n_embd, n_layer=shape.n_layer,
        n_head=shape.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=special, eos_token_id=None, pad_token_id=special, attn_implementation="sdpa",
    )


def build_model(shape: Shape, name: str) -> torch.nn.Module:
    """One contestant with its own random weights, in train mode, without dropout."""
    config = gpt2_config(shape)
    if name == "gpt2":
        model = GPT2LMHeadModel(config)
    elif name == "glade":
        model = GladeForCausalLM(glade_config_from_gpt2(config))
    else:
        model = NanoGPT(shape.vocab_size, shape.n_positions, shape.n_embd, shape.n_layer, shape.n_head)
    return model.train()


def build_models(shape: Shape, seed: int = 0) -> dict[str, torch.nn.Module]:
    """`{"gpt2": ..., "glade": ..., "nanogpt": ...}` holding GPT-2's seeded weights, converted."""
    torch.manual_seed(seed)
    models = {name: build_model(shape, name) for name in ("gpt2", "glade", "nanogpt")}
    glade = models["glade"]
    glade.load_state_dict(gpt2_to_glade(models["gpt2"].state_dict(), glade.config))
    models["nanogpt"].load_state_dict(glade.state_dict())
    return models


def make_batch(shape: Shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of [batch, seq_len] token ids, targets being the inputs shifted by one (nanoGPT's layout)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """One forward + backward + AdamW step, in fp32 or under bf16 autocast."""
    inputs, targets = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        if isinstance(getattr(model, "_orig_mod", model), NanoGPT):
            _, loss = model(inputs, targets)
        else:  # transformers models shift the labels themselves
            loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    # The fused kernel is what glade.training uses; every contestant gets the same optimizer.
    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)


def greedy_generate(
    variant: str, model: torch.nn.Module, max_length: int
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`generate(prompt, new_tokens)` the way a user of each variant would call it: `model.generate()`, or for
    "+compile" Glade's `CompiledDecoder` (static cache, one compiled step per token) sized for `max_length` tokens.
    Neither stops at an end-of-text id: the models have none (`build_models`), so every run has the same length."""
    if variant.endswith("+compile"):
        decoder = CompiledDecoder(model, max_length=max_length)
        return lambda prompt, new_tokens: decoder.generate(prompt, new_tokens)

    def generate(prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False
        )

    return generate


def prefill(model: torch.nn.Module, prompt: torch.Tensor) -> None:
    """The first step of generation: the whole prompt, keeping the cache and the last position's logits."""
    if isinstance(getattr(model, "_orig_mod", model), NanoGPT):
        model(prompt)
    else:
        model(input_ids=prompt, use_cache=True, logits_to_keep=1)
