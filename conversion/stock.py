"""Glade checkpoints as the stock transformers class that computes the same function, chosen from the config.

The classes, what each expresses and how a checkpoint maps onto it are the export families (families.py):

| Glade config | stock class |
| --- | --- |
| learned positions, LayerNorm, GELU MLP, biases (GPT-2) | `GPT2LMHeadModel` (as `glade export gpt2` writes it) |
| rotary positions, LayerNorm, GELU or squared-ReLU MLP, biases | `GPTNeoXForCausalLM` (sequential residual) |
| rotary positions, RMSNorm, SwiGLU, with or without biases and GQA | `LlamaForCausalLM` |
| the same with QK-norm, without biases | `Qwen3ForCausalLM` |

A config that its class cannot express (logit soft-capping, GQA with LayerNorm, ...) is refused with the options
named. Weights are renamed, split or regrouped, never changed, and every operation has its counterpart in the stock
class; dropout carries over where the stock class has it (it changes training, never inference).

A tied head stays tied, unless `untie_head` asks for it as its own tensor (a copy of the embedding, so the logits are
the same numbers): llama.cpp's `convert_hf_to_gguf.py` needs that for GPT-NeoX, whose llama.cpp graph requires an
output matrix (docs/exporting.md).
"""

import copy
from functools import partial
from pathlib import Path

from transformers import PreTrainedConfig, PreTrainedModel

from glade import GladeConfig
from glade.loading import CONFIG_NAME, read_config_file

from .saving import Conversion, export_glade, with_generation_config
from .families import ExportFamily, family_for
from .io import load_state_dict_files
from .state_dict import HEAD_KEY, StateDict, complete_head, model_from_state_dict


def stock_config_from_glade(config: GladeConfig) -> PreTrainedConfig:
    """The config of the stock class computing what `config` computes, or a ValueError naming what it cannot."""
    return family_for(config).stock_config(config)


def untied_config(config: GladeConfig) -> GladeConfig:
    """`config` with its own output head (`tie_word_embeddings=False`); a copy, the original is left as it is."""
    untied = copy.deepcopy(config)
    untied.tie_word_embeddings = False
    return untied


def untied_head(state_dict: StateDict, config: GladeConfig) -> StateDict:
    """The Glade state dict of `config` with the head as its own tensor: a copy of the embedding when tied."""
    completed = complete_head(state_dict, config)  # a tied checkpoint may omit the head; a differing one is refused
    if not config.tie_word_embeddings or HEAD_KEY not in completed:
        return completed
    return {**completed, HEAD_KEY: completed[HEAD_KEY].clone()}  # its own storage, saved as its own tensor


def load_glade_as(directory: Path, family: ExportFamily, *, untie_head: bool = False) -> PreTrainedModel:
    """A Glade checkpoint folder as an in-memory model of `family`'s stock class; with `untie_head`, with the output
    head as its own tensor (`tie_word_embeddings=False`) even where the checkpoint ties it."""
    config = read_config_file(Path(directory) / CONFIG_NAME)
    exported = untied_config(config) if untie_head else config
    stock_config = family.stock_config(exported)  # refuses before any weight is read
    state_dict = load_state_dict_files(directory)
    if untie_head:
        state_dict = untied_head(state_dict, config)
    state_dict = family.stock_tensors(state_dict, exported)
    return with_generation_config(model_from_state_dict(family.model_class, stock_config, state_dict), directory)


def load_glade_as_stock(directory: Path, *, untie_head: bool = False) -> PreTrainedModel:
    """A Glade checkpoint folder as an in-memory model of the stock class its config picks."""
    family = family_for(read_config_file(Path(directory) / CONFIG_NAME))
    return load_glade_as(directory, family, untie_head=untie_head)


def export_stock(
    source: str | Path,
    destination: str | Path,
    *,
    overwrite: bool = False,
    check: bool = False,
    untie_head: bool = False,
) -> Conversion:
    """Export a Glade checkpoint as a folder of the stock transformers class its config picks (no custom code).

    With `check`, the parity report against the source Glade model is written beside the weights. With `untie_head`,
    a tied head is written as its own tensor (`embed_out.weight` for GPT-NeoX, `lm_head.weight` for the others) with
    `tie_word_embeddings: false`: the same logits, in the layout llama.cpp's `convert_hf_to_gguf.py` needs for
    GPT-NeoX.
    """
    load = partial(load_glade_as_stock, untie_head=untie_head)
    return export_glade(source, destination, load, overwrite=overwrite, check=check)
