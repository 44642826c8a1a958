"""`glade export onnx`: a Glade checkpoint as an ONNX graph (input_ids, attention_mask -> logits) for onnxruntime.

The graph comes from `torch.onnx.export(dynamo=True)`, with batch and sequence as dynamic axes, and has no KV cache:
each call runs the whole sequence. The folder also holds the config, generation config and tokenizer, so a user has
everything to tokenize, run and decode.
"""

import importlib.util
from pathlib import Path

import torch
from torch import nn

from glade import GladeForCausalLM
from glade.atomic import atomic_directory
from glade.checkpoints import check_finite

from .checkpoint import resolve_source
from .io import copy_tokenizer_files

ONNX_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
# torch.onnx's dynamo exporter builds the graph with onnxscript and onnx, which glade does not otherwise need.
ONNX_EXPORT_MODULES = ("onnxscript", "onnx")


class LogitsOnly(nn.Module):
    """A causal LM with the ONNX graph's signature: two tensors in, the logits out, no cache."""

    def __init__(self, model: GladeForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def require_onnx_export_modules() -> None:
    """Raise a ModuleNotFoundError naming the extra to install when the exporter's modules are missing."""
    missing = [name for name in ONNX_EXPORT_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"glade export onnx needs {' and '.join(missing)}: pip install 'glade[onnx]'")


def export_onnx(source: str | Path, destination: str | Path, *, overwrite: bool = False) -> Path:
    """Export a Glade checkpoint (folder or hub id) to `destination`/model.onnx, with its config and tokenizer."""
    require_onnx_export_modules()
    directory = resolve_source(source)
    # Eager attention: an explicit additive mask, which every ONNX opset expresses.
    model = GladeForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    check_finite(directory, model.state_dict().items())
    with atomic_directory(destination, overwrite=overwrite) as staging:
        onnx_program(model).save(staging / ONNX_FILE)
        # No PyTorch model here: auto_map keeps only the config class, whose file the save copies beside it.
        model.config.auto_map = None
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        copy_tokenizer_files(directory, staging)
    return Path(destination)


def onnx_program(model: GladeForCausalLM) -> torch.onnx.ONNXProgram:
    """The ONNX program of `model`'s logits, dynamic in batch and sequence length."""
    # Two rows of four tokens, one left-padded: sizes of 1 would be specialised, and padding must be traced.
    input_ids = torch.zeros(2, 4, dtype=torch.long)
    attention_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=model.config.n_positions)}
    with torch.no_grad():
        return torch.onnx.export(
            LogitsOnly(model).eval(),
            (input_ids, attention_mask),
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={name: axes for name in INPUT_NAMES},
        )
