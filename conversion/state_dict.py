"""Pure state-dict conversions between GPT-2 / nanoGPT layouts and Glade's.

Glade keeps GPT-2's parameter names, and nanoGPT uses the same names too, so the key map is only about prefixes and
leftovers: checkpoints may lack the `transformer.` prefix (old GPT-2 exports), carry torch.compile's `_orig_mod.`
prefix (nanoGPT), or store the causal mask as `attn.bias` / `attn.masked_bias` buffers. The one change of layout is
GPT-2's `Conv1D`, which stores projection weights as [in, out] where `nn.Linear` stores [out, in].
"""

import re
from typing import TypeVar

import torch
from torch import nn
from transformers import PreTrainedConfig

from glade import GladeConfig, GladeForCausalLM
from glade.checkpoints import COMPILED_PREFIX, check_tensors

StateDict = dict[str, torch.Tensor]
ModelT = TypeVar("ModelT", bound=nn.Module)

BASE_PREFIX = "transformer."
EMBEDDING_KEY = "transformer.wte.weight"
HEAD_KEY = "lm_head.weight"
# Weights stored transposed by GPT-2's Conv1D (relative to each block, `transformer.h.N.`).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_CONV1D_KEY = re.compile(r"transformer\.h\.\d+\.(" + "|".join(re.escape(name) for name in CONV1D_WEIGHTS) + ")")
# Causal-mask buffers (not parameters): Glade builds its masks on the fly.
_MASK_BUFFER_KEY = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def normalize_keys(state_dict: StateDict) -> StateDict:
    """Canonical `transformer.`-prefixed keys, without compile prefixes or causal-mask buffers."""
    normalized = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix(COMPILED_PREFIX)
        if not key.startswith((BASE_PREFIX, "lm_head.")):
            key = BASE_PREFIX + key
        if _MASK_BUFFER_KEY.fullmatch(key):
            continue
        if key in normalized:
            raise ValueError(f"Checkpoint holds {key!r} twice (with and without a prefix)")
        normalized[key] = tensor
    return normalized


def transpose_conv1d(state_dict: StateDict) -> StateDict:
    """Swap Conv1D's [in, out] and Linear's [out, in]; the map is its own inverse."""
    return {
        key: tensor.t().contiguous() if _CONV1D_KEY.fullmatch(key) else tensor for key, tensor in state_dict.items()
    }


def crop_vocab(state_dict: StateDict, vocab_size: int) -> StateDict:
    """Keep the first `vocab_size` rows of the embedding and head (nanoGPT pads 50257 to 50304 for speed)."""
    current = state_dict[EMBEDDING_KEY].shape[0]
    if not 0 < vocab_size <= current:
        raise ValueError(f"Cannot crop the vocabulary to {vocab_size}: the checkpoint has {current} token embeddings")
    return {
        key: tensor[:vocab_size].clone() if key in (EMBEDDING_KEY, HEAD_KEY) else tensor
        for key, tensor in state_dict.items()
    }


def complete_head(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """Fill in a tied head from the embedding (checkpoints often omit it), refusing a tied head that differs."""
    if not config.tie_word_embeddings or EMBEDDING_KEY not in state_dict:
        return state_dict
    head = state_dict.get(HEAD_KEY)
    if head is not None and not torch.equal(head, state_dict[EMBEDDING_KEY]):
        raise ValueError(
            f"{HEAD_KEY} differs from {EMBEDDING_KEY}, but the config ties them (tie_word_embeddings=True); "
            "converting would silently drop the head"
        )
    return {**state_dict, HEAD_KEY: state_dict[EMBEDDING_KEY]}


def glade_shapes(config: GladeConfig) -> dict[str, torch.Size]:
    """Every key of a `GladeForCausalLM` state dict with its shape, read off a weightless (meta) model."""
    with torch.device("meta"):
        model = GladeForCausalLM(config)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def check_glade_state_dict(state_dict: StateDict, config: GladeConfig) -> None:
    """Raise a ValueError listing every missing, unexpected and wrongly shaped tensor."""
    expected = glade_shapes(config)
    check_tensors(
        "Checkpoint (shapes in Glade's [out, in] layout)",
        missing=expected.keys() - state_dict.keys(),
        unexpected=state_dict.keys() - expected.keys(),
        wrong_shapes=[
            (key, state_dict[key].shape, expected[key])
            for key in expected.keys() & state_dict.keys()
            if state_dict[key].shape != expected[key]
        ],
    )


def gpt2_to_glade(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """A Hugging Face GPT-2 (`GPT2LMHeadModel`) state dict as a complete, checked Glade state dict."""
    converted = complete_head(transpose_conv1d(normalize_keys(state_dict)), config)
    check_glade_state_dict(converted, config)
    return converted


def nanogpt_to_glade(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """A nanoGPT `GPT.state_dict()` (already nn.Linear, same names) as a complete, checked Glade state dict.

    `config.vocab_size` may be smaller than the checkpoint's padded vocabulary: the extra rows are cropped.
    """
    converted = normalize_keys(state_dict)
    if EMBEDDING_KEY in converted and converted[EMBEDDING_KEY].shape[0] != config.vocab_size:
        converted = crop_vocab(converted, config.vocab_size)
    converted = complete_head(converted, config)
    check_glade_state_dict(converted, config)
    return converted


def glade_to_gpt2(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """A Glade state dict as a `GPT2LMHeadModel` state dict (the head stays only when untied)."""
    converted = complete_head(state_dict, config)
    check_glade_state_dict(converted, config)
    if config.tie_word_embeddings:
        converted = {key: tensor for key, tensor in converted.items() if key != HEAD_KEY}
    return transpose_conv1d(converted)


def model_from_state_dict(model_class: type[ModelT], config: PreTrainedConfig, state_dict: StateDict) -> ModelT:
    """`model_class(config)` holding the tensors of `state_dict`: built on the meta device (no random init), then
    given the tensors themselves (no copy), in eval mode."""
    with torch.device("meta"):
        model = model_class(config)
    # Not strict: a tied head may be absent, and tie_weights() then points it at the embedding.
    unexpected = model.load_state_dict(state_dict, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise ValueError(f"Unexpected weights {', '.join(unexpected)}")
    model.tie_weights()
    if leftover := [name for name, tensor in model.state_dict().items() if tensor.is_meta]:
        raise ValueError(f"No weights for {', '.join(leftover)}")
    return model.eval()
