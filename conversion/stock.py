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
"""

from pathlib import Path

from transformers import PreTrainedConfig, PreTrainedModel

from glade import GladeConfig
from glade.loading import CONFIG_NAME, read_config_file

from .saving import Conversion, export_glade, with_generation_config
from .families import ExportFamily, family_for
from .io import load_state_dict_files
from .state_dict import model_from_state_dict


def stock_config_from_glade(config: GladeConfig) -> PreTrainedConfig:
    """The config of the stock class computing what `config` computes, or a ValueError naming what it cannot."""
    return family_for(config).stock_config(config)


def load_glade_as(directory: Path, family: ExportFamily) -> PreTrainedModel:
    """A Glade checkpoint folder as an in-memory model of `family`'s stock class."""
    config = read_config_file(Path(directory) / CONFIG_NAME)
    stock_config = family.stock_config(config)  # refuses before any weight is read
    state_dict = family.stock_tensors(load_state_dict_files(directory), config)
    return with_generation_config(model_from_state_dict(family.model_class, stock_config, state_dict), directory)


def load_glade_as_stock(directory: Path) -> PreTrainedModel:
    """A Glade checkpoint folder as an in-memory model of the stock class its config picks."""
    return load_glade_as(directory, family_for(read_config_file(Path(directory) / CONFIG_NAME)))


def export_stock(
    source: str | Path, destination: str | Path, *, overwrite: bool = False, check: bool = False
) -> Conversion:
    """Export a Glade checkpoint as a folder of the stock transformers class its config picks (no custom code).

    With `check`, the parity report against the source Glade model is written beside the weights.
    """
    return export_glade(source, destination, load_glade_as_stock, overwrite=overwrite, check=check)
