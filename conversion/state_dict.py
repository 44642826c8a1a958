"""Pure state-dict conversions between GPT-2 / nanoGPT layouts and Glade's, and from Glade to Llama, Qwen3 and GPT-NeoX
(as transformers and as llama.cpp lay them out): the tensor maps of the export families (families.py).

Glade keeps GPT-2's parameter names, and nanoGPT uses the same names too, so the key map is only about prefixes and
leftovers: checkpoints may lack the `transformer.` prefix (old GPT-2 exports), carry torch.compile's `_orig_mod.`
prefix (nanoGPT), or store the causal mask as `attn.bias` / `attn.masked_bias` buffers. The one change of layout is
GPT-2's `Conv1D`, which stores projection weights as [in, out] where `nn.Linear` stores [out, in].

Llama, Qwen3 and GPT-NeoX use `nn.Linear` too, so exporting to them renames modules; only the fused q|k|v projection
changes layout: Llama and Qwen3 keep three matrices, GPT-NeoX one fused per head.

The GGUF maps name tensors as Hugging Face does (gguf's tensor map turns those names into llama.cpp's), in
nn.Linear's [out, in] layout, which is ggml's, and reorder rows where llama.cpp's graph reads them differently from
transformers.
"""

import re
from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import PreTrainedConfig

from glade import GladeConfig, GladeForCausalLM
from glade.loading import COMPILED_PREFIX, check_tensors

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
# A block's tensor: its index, the module inside the block, and weight or bias.
_BLOCK_KEY = re.compile(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)")
FUSED_QKV = "attn.c_attn"

# Glade's modules under Llama's and Qwen3's names (outside the blocks, then inside block i); q|k|v is split apart.
LLAMA_NAMES = {"wte": "model.embed_tokens", "ln_f": "model.norm"}
LLAMA_BLOCK_NAMES = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "mlp.c_gate": "mlp.gate_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
LLAMA_QKV_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# The same for NanoChat: Llama's attention names, an MLP of two matrices, and norms without tensors.
NANOCHAT_BLOCK_NAMES = {"attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# The same for GPT-NeoX, whose q|k|v stays fused.
GPT_NEOX_NAMES = {"wte": "gpt_neox.embed_in", "ln_f": "gpt_neox.final_layer_norm"}
GPT_NEOX_BLOCK_NAMES = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    FUSED_QKV: "attention.query_key_value",
    "attn.c_proj": "attention.dense",
    "mlp.c_fc": "mlp.dense_h_to_4h",
    "mlp.c_proj": "mlp.dense_4h_to_h",
}


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


def exportable_glade_state_dict(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """A Glade state dict, checked against its config, with the head only when untied (stock classes tie it back)."""
    converted = complete_head(state_dict, config)
    check_glade_state_dict(converted, config)
    if config.tie_word_embeddings:
        converted = {key: tensor for key, tensor in converted.items() if key != HEAD_KEY}
    return converted


def glade_to_gpt2(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """A Glade state dict as a `GPT2LMHeadModel` state dict (the head stays only when untied)."""
    return transpose_conv1d(exportable_glade_state_dict(state_dict, config))


def glade_to_llama(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """A Glade state dict as a `LlamaForCausalLM` or `Qwen3ForCausalLM` state dict: q|k|v split into three
    projections, every other tensor renamed as it is."""
    return _rename_glade_modules(
        exportable_glade_state_dict(state_dict, config), LLAMA_NAMES, "model.layers", LLAMA_BLOCK_NAMES,
        _split_qkv(config),
    )


def _split_qkv(config: GladeConfig) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """The fused q|k|v tensor as Llama's three projections."""
    head_dim = config.n_embd // config.n_head
    qkv_sizes = (config.n_head * head_dim, config.n_kv_head * head_dim, config.n_kv_head * head_dim)
    return lambda tensor: dict(zip(LLAMA_QKV_NAMES, tensor.split(qkv_sizes)))


def _map_query_key_rows(
    tensors: StateDict, config: GladeConfig, rows: Callable[[torch.Tensor, int], torch.Tensor]
) -> StateDict:
    """Llama-named tensors with `rows(tensor, heads)` applied to every q and k projection (weights and biases)."""
    for key, tensor in tensors.items():
        if ".self_attn.q_proj." in key or ".self_attn.k_proj." in key:
            tensors[key] = rows(tensor, config.n_head if ".q_proj." in key else config.n_kv_head)
    return tensors


def reverse_rotation(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection with each head's second half negated. NanoChat rotates each pair of channels the
    other way round from Llama (its rotate_half is (x2, -x1)); on negated second halves Llama's rotation gives
    NanoChat's rotated values with the same second halves negated, whose dot products (and RMS norms) are the same
    numbers: negation is exact."""
    halves = tensor.unflatten(0, (heads, 2, -1)).clone()
    halves[:, 1] = -halves[:, 1]
    return halves.reshape(tensor.shape)


def glade_to_nanochat(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """A Glade state dict as a `NanoChatForCausalLM` state dict: Llama's split of q|k|v, with q and k in NanoChat's
    direction of rotation."""
    tensors = _rename_glade_modules(
        exportable_glade_state_dict(state_dict, config), LLAMA_NAMES, "model.layers", NANOCHAT_BLOCK_NAMES,
        _split_qkv(config),
    )
    return _map_query_key_rows(tensors, config, reverse_rotation)


def glade_to_gpt_neox(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """A Glade state dict as a `GPTNeoXForCausalLM` state dict: the fused q|k|v regrouped by head, the rest renamed."""

    def group_by_head(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        # GPT-NeoX reads its fused output as [head, q|k|v, head_dim]; Glade's is [q|k|v, head, head_dim].
        by_head = tensor.unflatten(0, (3, config.n_head, -1)).transpose(0, 1).flatten(0, 2)
        return {GPT_NEOX_BLOCK_NAMES[FUSED_QKV]: by_head.contiguous()}

    return _rename_glade_modules(
        exportable_glade_state_dict(state_dict, config), GPT_NEOX_NAMES, "gpt_neox.layers", GPT_NEOX_BLOCK_NAMES,
        group_by_head,
    )


def glade_to_gguf_gpt2(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """A Glade state dict for llama.cpp's gpt2 architecture: Glade keeps GPT-2's names, which gguf maps, and a tied
    head is left out (llama.cpp then reads token_embd as the output matrix)."""
    return exportable_glade_state_dict(state_dict, config)


def interleave_rotary_pairs(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection reordered from transformers' rotary layout (each head's first half pairs with
    its second half) to the one llama.cpp's llama graph rotates (neighbouring rows pair), as its converter does."""
    return tensor.unflatten(0, (heads, 2, -1)).transpose(1, 2).reshape(tensor.shape)


def glade_to_gguf_llama(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """A Glade state dict for llama.cpp's llama architecture: Llama's, with q and k rows in llama.cpp's rotary order
    (a tied head is left out, as in transformers' Llama)."""
    return _map_query_key_rows(glade_to_llama(state_dict, config), config, interleave_rotary_pairs)


def glade_to_gguf_nemotron(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """A Glade state dict for llama.cpp's nemotron architecture: Llama's names (q, k and v apart, in transformers'
    rotary order, which nemotron's rotates), the MLP's two matrices as up and down, and the output matrix always
    present."""
    tensors = glade_to_llama(state_dict, config)
    # Unlike transformers' Nemotron, llama.cpp requires an output matrix: a tied head is written out.
    tensors.setdefault(HEAD_KEY, tensors["model.embed_tokens.weight"])
    return tensors


def glade_to_gguf_gpt_neox(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """A Glade state dict for llama.cpp's gptneox architecture: GPT-NeoX's names, q|k|v stacked as Glade keeps
    them, and the output matrix always present."""
    tensors = glade_to_gpt_neox(state_dict, config)
    # Unlike its gpt2 and llama graphs, llama.cpp's gptneox requires an output matrix: a tied head is written out.
    tensors.setdefault("embed_out.weight", tensors["gpt_neox.embed_in.weight"])
    for key, tensor in tensors.items():
        if ".attention.query_key_value." in key:
            # llama.cpp's gptneox reads q|k|v stacked, as Glade keeps them, not grouped by head as GPT-NeoX does.
            tensors[key] = tensor.unflatten(0, (config.n_head, 3, -1)).transpose(0, 1).reshape(tensor.shape)
    return tensors


def _rename_glade_modules(
    state_dict: StateDict,
    names: dict[str, str],
    blocks: str,
    block_names: dict[str, str],
    convert_qkv: Callable[[torch.Tensor], dict[str, torch.Tensor]],
) -> StateDict:
    """Glade's tensors under another model's module names; `convert_qkv` maps a fused q|k|v tensor to the target's
    module name(s) and tensor(s)."""
    renamed = {}
    for key, tensor in state_dict.items():
        try:
            if key == HEAD_KEY:
                renamed[key] = tensor
            elif match := _BLOCK_KEY.fullmatch(key):
                index, module, param = match.groups()
                parts = convert_qkv(tensor) if module == FUSED_QKV else {block_names[module]: tensor}
                renamed.update({f"{blocks}.{index}.{name}.{param}": part for name, part in parts.items()})
            else:
                module, param = key.removeprefix(BASE_PREFIX).rsplit(".", 1)
                renamed[f"{names[module]}.{param}"] = tensor
        except KeyError as error:
            raise ValueError(f"{key} has no counterpart in the exported model") from error
    return renamed


def model_from_state_dict(model_class: type[ModelT], config: PreTrainedConfig, state_dict: StateDict) -> ModelT:
    """`model_class(config)` holding the tensors of `state_dict`: its parameters built on the meta device (no random
    init), then given the tensors themselves (no copy), in eval mode."""
    # Buffers stay real: non-persistent ones (rotary frequencies) are computed in __init__ and never loaded.
    with init_empty_weights(include_buffers=False):
        model = model_class(config)
    # Not strict: a tied head may be absent, and tie_weights() then points it at the embedding.
    unexpected = model.load_state_dict(state_dict, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise ValueError(f"Unexpected weights {', '.join(unexpected)}")
    model.tie_weights()
    if leftover := [name for name, tensor in model.state_dict().items() if tensor.is_meta]:
        raise ValueError(f"No weights for {', '.join(leftover)}")
    return model.eval()
