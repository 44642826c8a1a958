"""Glade checkpoints as the stock transformers class that computes the same function, chosen from the config.

| Glade config | stock class |
| --- | --- |
| learned positions, LayerNorm, GELU MLP, biases (GPT-2) | `GPT2LMHeadModel` (see gpt2.py) |
| rotary positions, LayerNorm, GELU or squared-ReLU MLP, biases | `GPTNeoXForCausalLM` (sequential residual) |
| rotary positions, RMSNorm, SwiGLU, with or without biases and GQA | `LlamaForCausalLM` |
| the same with QK-norm, without biases | `Qwen3ForCausalLM` |

A config that its class cannot express (logit soft-capping, GQA with LayerNorm, ...) is refused with the options
named. Weights are renamed, split or regrouped, never changed, and every operation has its counterpart in the stock
class; dropout carries over where the stock class has it (it changes training, never inference).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from glade import GladeConfig
from glade.checkpoints import CONFIG_NAME, read_config_file

from .checkpoint import Conversion, export_glade, resolve_source, with_generation_config
from .gpt2 import export_gpt2, gpt2_config_from_glade, load_glade_as_gpt2
from .io import load_state_dict_files
from .state_dict import StateDict, glade_to_gpt_neox, glade_to_llama, model_from_state_dict

# Glade's MLP activations -> GPT-NeoX's `hidden_act`. gelu_pytorch_tanh is torch's tanh-approximate GELU, the kernel
# Glade's gelu_new runs; transformers' "gelu_new" writes the same formula out in Python and rounds differently.
GPT_NEOX_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh", "gelu": "gelu", "relu2": "relu2"}
# What each stock class computes, as the values of GladeConfig fields it accepts.
GPT_NEOX_EXPRESSES = {
    "positions": ("rotary",),
    "norm": ("layernorm",),
    "qk_norm": (False,),
    "activation_function": tuple(GPT_NEOX_ACTIVATIONS),
    "logit_softcap": (None,),
    "bias": (True,),  # its LayerNorms and MLP always carry biases
}
LLAMA_EXPRESSES = {
    "positions": ("rotary",),
    "norm": ("rmsnorm",),
    "qk_norm": (False,),
    "activation_function": ("swiglu",),
    "logit_softcap": (None,),
}
QWEN3_EXPRESSES = {**LLAMA_EXPRESSES, "qk_norm": (True,), "bias": (False,)}  # its MLP has no biases


@dataclass(frozen=True)
class StockClass:
    """A stock transformers class with the two halves of an export to it: its config and its state dict."""

    model_class: type[PreTrainedModel]
    config_from_glade: Callable[[GladeConfig], PreTrainedConfig]
    state_dict_from_glade: Callable[[StateDict, GladeConfig], StateDict]


def stock_model_type(config: GladeConfig) -> str:
    """The model_type of the stock class for `config`: positions and norm decide, the other options must follow."""
    if config.positions == "learned":
        return "gpt2"
    if config.norm == "layernorm":
        return "gpt_neox"
    return "qwen3" if config.qk_norm else "llama"


def check_expressible(config: GladeConfig, class_name: str, expresses: dict[str, tuple[Any, ...]]) -> None:
    """Raise a ValueError naming every option of `config` outside what `class_name` computes."""
    unexpressed = {
        name: getattr(config, name) for name, values in expresses.items() if getattr(config, name) not in values
    }
    if unexpressed:
        options = ", ".join(f"{name}={value!r}" for name, value in unexpressed.items())
        raise ValueError(f"Glade config uses {options}, which {class_name} cannot express")


def gpt_neox_config_from_glade(config: GladeConfig) -> GPTNeoXConfig:
    """The `GPTNeoXConfig` computing what `config` computes, or a ValueError naming what it cannot express."""
    expresses = {**GPT_NEOX_EXPRESSES, "n_kv_head": (config.n_head,)}  # no grouped-query attention
    check_expressible(config, "GPTNeoXForCausalLM", expresses)
    stock = GPTNeoXConfig(
        **_shared_fields(config),
        rope_parameters={**config.rope_parameters, "partial_rotary_factor": 1.0},
        hidden_act=GPT_NEOX_ACTIVATIONS[config.activation_function],
        hidden_dropout=config.resid_pdrop,
        layer_norm_eps=config.layer_norm_epsilon,
        use_parallel_residual=False,
        attention_bias=True,
    )
    # transformers 5 writes only rope_parameters; transformers 4 and llama.cpp's converter read these names.
    stock.rotary_pct = 1.0
    stock.rotary_emb_base = config.rope_parameters["rope_theta"]
    return stock


def llama_config_from_glade(config: GladeConfig) -> LlamaConfig:
    """The `LlamaConfig` computing what `config` computes, or a ValueError naming what it cannot express."""
    check_expressible(config, "LlamaForCausalLM", LLAMA_EXPRESSES)
    return _with_rope_theta(LlamaConfig(**_llama_fields(config), mlp_bias=config.bias))


def qwen3_config_from_glade(config: GladeConfig) -> Qwen3Config:
    """The `Qwen3Config` computing what `config` computes, or a ValueError naming what it cannot express."""
    check_expressible(config, "Qwen3ForCausalLM", QWEN3_EXPRESSES)
    return _with_rope_theta(Qwen3Config(**_llama_fields(config)))


def _shared_fields(config: GladeConfig) -> dict[str, Any]:
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.n_inner,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        max_position_embeddings=config.n_positions,
        attention_dropout=config.attn_pdrop,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=config.use_cache,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def _llama_fields(config: GladeConfig) -> dict[str, Any]:
    return dict(
        **_shared_fields(config),
        rope_parameters=dict(config.rope_parameters),
        num_key_value_heads=config.n_kv_head,
        head_dim=config.n_embd // config.n_head,
        hidden_act="silu",
        rms_norm_eps=config.layer_norm_epsilon,
        attention_bias=config.bias,
    )


def _with_rope_theta(stock: PreTrainedConfig) -> PreTrainedConfig:
    # transformers 5 writes only rope_parameters; transformers 4 (and servers pinned to it) read rope_theta.
    stock.rope_theta = stock.rope_parameters["rope_theta"]
    return stock


# The rotary targets; GPT-2 has its own module (gpt2.py), which `glade export gpt2` uses too.
STOCK_CLASSES = {
    "gpt_neox": StockClass(GPTNeoXForCausalLM, gpt_neox_config_from_glade, glade_to_gpt_neox),
    "llama": StockClass(LlamaForCausalLM, llama_config_from_glade, glade_to_llama),
    "qwen3": StockClass(Qwen3ForCausalLM, qwen3_config_from_glade, glade_to_llama),
}


def stock_config_from_glade(config: GladeConfig) -> PreTrainedConfig:
    """The config of the stock class computing what `config` computes, or a ValueError naming what it cannot."""
    model_type = stock_model_type(config)
    if model_type == "gpt2":
        return gpt2_config_from_glade(config)
    return STOCK_CLASSES[model_type].config_from_glade(config)


def load_glade_as_stock(directory: Path) -> PreTrainedModel:
    """A Glade checkpoint folder as an in-memory model of the stock class its config picks."""
    config = read_config_file(Path(directory) / CONFIG_NAME)
    model_type = stock_model_type(config)
    if model_type == "gpt2":
        return load_glade_as_gpt2(directory)
    stock = STOCK_CLASSES[model_type]
    stock_config = stock.config_from_glade(config)  # refuses before any weight is read
    state_dict = stock.state_dict_from_glade(load_state_dict_files(directory), config)
    return with_generation_config(model_from_state_dict(stock.model_class, stock_config, state_dict), directory)


def export_stock(
    source: str | Path, destination: str | Path, *, overwrite: bool = False, check: bool = False
) -> Conversion:
    """Export a Glade checkpoint as a folder of the stock transformers class its config picks (no custom code).

    With `check`, the parity report against the source Glade model is written beside the weights.
    """
    directory = resolve_source(source)
    if stock_model_type(read_config_file(directory / CONFIG_NAME)) == "gpt2":
        return export_gpt2(source, destination, overwrite=overwrite, check=check)
    return export_glade(source, destination, load_glade_as_stock, overwrite=overwrite, check=check)
