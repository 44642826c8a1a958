"""Weights into Glade and back: Hugging Face GPT-2 and nanoGPT checkpoints in; stock GPT-2, GPT-NeoX, Llama, Qwen3 or
NanoChat out, as transformers folders (`stock.py`) or GGUF files (`gguf.py`), with parity reports; ONNX out
(`onnx.py`). Which stock family a config is written as, and how, is one table: `families.py`.

The conversions themselves are pure functions over state dicts (`state_dict.py`); the rest reads and writes
checkpoint folders, always into a temporary folder that is renamed into place only when everything succeeded.
"""

from .saving import Conversion, resolve_model_folder
from .families import FAMILIES, ExportFamily, family_for
from .gpt2 import (
    convert_gpt2,
    export_gpt2,
    glade_config_from_gpt2,
    gpt2_config_from_glade,
    load_glade_as_gpt2,
    load_gpt2_as_glade,
)
from .io import load_state_dict_files
from .nanogpt import convert_nanogpt, glade_config_from_nanogpt, load_nanogpt_as_glade
from .parity import ParityReport, compare_models, parity_batch, write_parity_report
from .state_dict import (
    glade_to_gpt2,
    glade_to_gpt_neox,
    glade_to_llama,
    glade_to_nanochat,
    gpt2_to_glade,
    nanogpt_to_glade,
)
from .stock import export_stock, load_glade_as_stock, stock_config_from_glade

__all__ = [
    "FAMILIES",
    "Conversion",
    "ExportFamily",
    "ParityReport",
    "compare_models",
    "convert_gpt2",
    "convert_nanogpt",
    "export_gpt2",
    "export_stock",
    "family_for",
    "glade_config_from_gpt2",
    "glade_config_from_nanogpt",
    "glade_to_gpt2",
    "glade_to_gpt_neox",
    "glade_to_llama",
    "glade_to_nanochat",
    "gpt2_config_from_glade",
    "gpt2_to_glade",
    "load_glade_as_gpt2",
    "load_glade_as_stock",
    "load_gpt2_as_glade",
    "load_nanogpt_as_glade",
    "load_state_dict_files",
    "nanogpt_to_glade",
    "parity_batch",
    "resolve_model_folder",
    "stock_config_from_glade",
    "write_parity_report",
]
