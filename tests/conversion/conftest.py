import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from glade.conversion import convert_gpt2

GPT2_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "gpt2-tokenizer"
GPT2_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def tiny_gpt2_config(**overrides) -> GPT2Config:
    fields = dict(
        vocab_size=257, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=256, eos_token_id=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        # Ten times GPT-2's init spread: a random model then continues a prompt with varied tokens, not one repeated.
        initializer_range=0.2,
    )
    return GPT2Config(**{**fields, **overrides})


def random_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_gpt2_config(**overrides)).eval()
    # GPT-2 initialises biases and LayerNorms to 0 / 1: randomise them so a mix-up of any two tensors shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" in name or name.endswith(".bias"):
                param.normal_(1.0 if name.endswith(".weight") else 0.0, 0.1)
    return model


@pytest.fixture
def gpt2_tokenizer_dir():
    return GPT2_TOKENIZER_DIR


@pytest.fixture
def gpt2_model():
    return random_gpt2()


@pytest.fixture
def gpt2_dir(tmp_path, gpt2_model):
    """A tiny GPT-2 checkpoint saved by transformers itself."""
    directory = tmp_path / "gpt2"
    gpt2_model.save_pretrained(directory)
    return directory


@pytest.fixture
def make_gpt2():
    return random_gpt2


@pytest.fixture
def make_glade(tmp_path, tmp_path_factory):
    """Factory: `random_gpt2(**overrides)` converted into the Glade checkpoint tmp_path / "glade", with GPT-2's
    tokenizer files. Its vocabulary is padded past the tokenizer's 50257 tokens to 50304, as nanoGPT's is."""

    def build(**overrides) -> Path:
        source = tmp_path_factory.mktemp("gpt2")
        model = random_gpt2(**{"vocab_size": 50304, "bos_token_id": 50256, "eos_token_id": 50256, **overrides})
        model.save_pretrained(source)
        for name in GPT2_TOKENIZER_FILES:
            shutil.copyfile(GPT2_TOKENIZER_DIR / name, source / name)
        return convert_gpt2(source, tmp_path / "glade").destination

    return build


def nanogpt_forward(state_dict: dict[str, torch.Tensor], n_head: int, idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's GPT.forward (model.py), written out over a clean state dict: the reference for conversions."""
    wte, wpe = state_dict["transformer.wte.weight"], state_dict["transformer.wpe.weight"]
    batch, length = idx.shape
    width = wte.shape[1]

    def layer_norm(x, name):
        return F.layer_norm(x, (width,), state_dict[f"{name}.weight"], state_dict.get(f"{name}.bias"), 1e-5)

    def linear(x, name):
        return F.linear(x, state_dict[f"{name}.weight"], state_dict.get(f"{name}.bias"))

    x = wte[idx] + wpe[:length]
    n_layer = 1 + max(int(key.split(".")[2]) for key in state_dict if key.startswith("transformer.h."))
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    for i in range(n_layer):
        block = f"transformer.h.{i}"
        q, k, v = linear(layer_norm(x, f"{block}.ln_1"), f"{block}.attn.c_attn").split(width, dim=2)
        q, k, v = (t.view(batch, length, n_head, width // n_head).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        attention = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        y = (attention @ v).transpose(1, 2).contiguous().view(batch, length, width)
        x = x + linear(y, f"{block}.attn.c_proj")
        x = x + linear(F.gelu(linear(layer_norm(x, f"{block}.ln_2"), f"{block}.mlp.c_fc")), f"{block}.mlp.c_proj")
    return layer_norm(x, "transformer.ln_f") @ wte.t()


def nanogpt_state_dict(n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int, bias: bool, seed=0):
    """Random weights in nanoGPT's layout and names (nn.Linear [out, in]; no biases at all when bias=False)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, mean=0.0):
        return mean + 0.1 * torch.randn(*shape, generator=generator)

    state_dict = {
        "transformer.wte.weight": randn(vocab_size, n_embd),
        "transformer.wpe.weight": randn(block_size, n_embd),
    }
    shapes = {"attn.c_attn": (3 * n_embd, n_embd), "attn.c_proj": (n_embd, n_embd), "mlp.c_fc": (4 * n_embd, n_embd),
              "mlp.c_proj": (n_embd, 4 * n_embd)}
    for i in range(n_layer):
        for norm in ("ln_1", "ln_2"):
            state_dict[f"transformer.h.{i}.{norm}.weight"] = randn(n_embd, mean=1.0)
            if bias:
                state_dict[f"transformer.h.{i}.{norm}.bias"] = randn(n_embd)
        for name, shape in shapes.items():
            state_dict[f"transformer.h.{i}.{name}.weight"] = randn(*shape)
            if bias:
                state_dict[f"transformer.h.{i}.{name}.bias"] = randn(shape[0])
    state_dict["transformer.ln_f.weight"] = randn(n_embd, mean=1.0)
    if bias:
        state_dict["transformer.ln_f.bias"] = randn(n_embd)
    return state_dict


def nanogpt_checkpoint(state_dict: dict[str, torch.Tensor], model_args: dict, compiled: bool = True) -> dict:
    """What nanoGPT's train.py saves: a compiled model's keys, the (non-flash) causal-mask buffers, the tied head."""
    model = dict(state_dict)
    model["lm_head.weight"] = state_dict["transformer.wte.weight"]
    block_size = model_args["block_size"]
    for i in range(model_args["n_layer"]):
        mask = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        model[f"transformer.h.{i}.attn.bias"] = mask
    prefix = "_orig_mod." if compiled else ""
    return {
        "model": {prefix + key: tensor for key, tensor in model.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 6e-4, "params": [0, 1]}]},
        "model_args": model_args,
        "iter_num": 100,
        "best_val_loss": torch.tensor(3.25),
        "config": {"batch_size": 12, "dataset": "openwebtext"},
    }


@pytest.fixture
def nanogpt_reference():
    return nanogpt_forward


@pytest.fixture
def nanogpt():
    """Factory: (checkpoint path, clean state dict, model_args) for a random nanoGPT model."""

    def build(path: Path, *, bias=True, vocab_size=256, n_embd=64, compiled=True):
        model_args = dict(
            n_layer=2, n_head=4, n_embd=n_embd, block_size=64, bias=bias, vocab_size=vocab_size, dropout=0.0
        )
        state_dict = nanogpt_state_dict(
            model_args["n_layer"], model_args["n_head"], n_embd, model_args["block_size"], vocab_size, bias
        )
        torch.save(nanogpt_checkpoint(state_dict, model_args, compiled=compiled), path)
        return path, state_dict, model_args

    return build
