"""`glade export onnx`: a Glade checkpoint as an ONNX graph (input_ids, attention_mask -> logits) for onnxruntime.

The graph comes from `torch.onnx.export(dynamo=True)`, with batch and sequence as dynamic axes, and has no KV cache:
each call runs the whole sequence. The folder also holds the config, generation config and tokenizer, so a user has
everything to tokenize, run and decode.

A sequence longer than n_positions must fail in onnxruntime as it does in PyTorch, but the exporter cannot carry that
bound: the model's length check is Python that tracing skips, the sequence Dim's max becomes a guard on the inputs of
torch.export's program that an ONNX dimension (a bare name) cannot hold, and torch.onnx drops assertion nodes. Left
so, a rotary model ran any length and a learned-positions one failed in its position embedding's Gather, unnamed.
So the graph looks every position up in a table of n_positions zeros, which onnxruntime's Gather refuses past its end.
"""

import importlib.util
from pathlib import Path

import torch
from torch import nn

from glade import GladeForCausalLM
from glade.atomic import atomic_directory
from glade.loading import load_causal_lm, read_glade_config

from .saving import resolve_model_folder
from .io import copy_tokenizer_files

ONNX_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
# torch.onnx's dynamo exporter builds the graph with onnxscript and onnx, which glade does not otherwise need.
ONNX_EXPORT_MODULES = ("onnxscript", "onnx")
# The table of n_positions zeros, and the Gather reading it, which onnxruntime names when a sequence is too long.
POSITION_TABLE = "position_table"
TOO_LONG_NODE = "sequence_longer_than_n_positions"


class LogitsOnly(nn.Module):
    """A causal LM with the ONNX graph's signature: two tensors in, the logits out, no cache; in ONNX, a sequence
    longer than n_positions fails in a lookup past the end of the position table."""

    def __init__(self, model: GladeForCausalLM):
        super().__init__()
        self.model = model
        self.register_buffer(POSITION_TABLE, torch.zeros(model.config.n_positions, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        # Adding zeros leaves the mask as it is; the lookup bounds the length. The model's positions come from the
        # mask, so a learned-positions model's own lookup runs after this one.
        attention_mask = attention_mask + self.get_buffer(POSITION_TABLE).index_select(0, positions)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def require_onnx_export_modules() -> None:
    """Raise a ModuleNotFoundError naming the extra to install when the exporter's modules are missing."""
    missing = [name for name in ONNX_EXPORT_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"glade export onnx needs {' and '.join(missing)}: pip install 'glade[onnx]'")


def export_onnx(source: str | Path, destination: str | Path, *, overwrite: bool = False) -> Path:
    """Export a Glade checkpoint (folder or hub id) to `destination`/model.onnx, with its config and tokenizer.

    The checkpoint loads strictly (a missing, unexpected or non-finite tensor is a ValueError naming it), before the
    exporter's modules are looked for: what is wrong with it is reported wherever the command runs.
    """
    directory = resolve_model_folder(source)
    # The strict loader takes any causal LM; another model type is refused by name, not exported.
    config = read_glade_config(str(directory))
    # Eager attention: an explicit additive mask, which every ONNX opset expresses.
    model = load_causal_lm(str(directory), config=config, attn_implementation="eager").eval()
    require_onnx_export_modules()
    with atomic_directory(destination, overwrite=overwrite) as staging:
        onnx_program(model).save(staging / ONNX_FILE)
        # No PyTorch model here: auto_map keeps only the config class, whose file the save copies beside it.
        model.config.auto_map = None
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        copy_tokenizer_files(directory, staging)
    return Path(destination)


def onnx_program(model: GladeForCausalLM) -> torch.onnx.ONNXProgram:
    """The ONNX program of `model`'s logits, dynamic in batch and sequence length (up to n_positions)."""
    # Two rows of four tokens, one left-padded: sizes of 1 would be specialised, and padding must be traced.
    input_ids = torch.zeros(2, 4, dtype=torch.long)
    attention_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    # ONNX keeps the sequence axis's name, not this max: LogitsOnly's position table enforces it.
    axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=model.config.n_positions)}
    with torch.no_grad():
        program = torch.onnx.export(
            LogitsOnly(model).eval(),
            (input_ids, attention_mask),
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={name: axes for name in INPUT_NAMES},
        )
    # onnxruntime's error names the failing node (here an anonymous "node_index_select"): say what failed.
    for node, _ in program.model.graph.initializers[POSITION_TABLE].uses():
        node.name = TOO_LONG_NODE
    return program
