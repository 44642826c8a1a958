"""Hugging Face GPT-2 (`GPT2LMHeadModel`) checkpoints into Glade, and Glade checkpoints back out as stock GPT-2."""

from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import GPT2Config, GPT2LMHeadModel

from glade import GladeConfig, GladeForCausalLM
from glade.loading import CONFIG_NAME, read_json, require_model_type

from .saving import Conversion, export_glade, resolve_model_folder, save_conversion, with_generation_config
from .families import FAMILIES, GPT2_SHARED_FIELDS
from .io import load_state_dict_files
from .state_dict import gpt2_to_glade, model_from_state_dict
from .stock import load_glade_as

# GPT-2 activation names -> Glade's. gelu_pytorch_tanh is the same tanh approximation as gelu_new.
GPT2_TO_GLADE_ACTIVATION = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}
# GPT-2 options that change the computation in ways Glade does not implement, with the value Glade matches.
UNSUPPORTED_GPT2_FLAGS = {
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "scale_attn_weights": True,
}


def glade_config_from_gpt2(config: GPT2Config) -> GladeConfig:
    """The Glade config computing what `config` computes, or a ValueError naming what Glade cannot express."""
    unsupported = [
        f"{flag}={getattr(config, flag)}"
        for flag, supported in UNSUPPORTED_GPT2_FLAGS.items()
        if getattr(config, flag) != supported
    ]
    if unsupported:
        raise ValueError(f"GPT-2 config uses options Glade does not implement: {', '.join(unsupported)}")
    if config.activation_function not in GPT2_TO_GLADE_ACTIVATION:
        raise ValueError(
            f"GPT-2 config has activation_function={config.activation_function!r}; Glade supports "
            f"{', '.join(GPT2_TO_GLADE_ACTIVATION)}"
        )
    return GladeConfig(
        **{name: getattr(config, name) for name in GPT2_SHARED_FIELDS},
        activation_function=GPT2_TO_GLADE_ACTIVATION[config.activation_function],
        bias=True,
    )


def gpt2_config_from_glade(config: GladeConfig) -> GPT2Config:
    """The stock GPT-2 config computing what `config` computes, or a ValueError naming what GPT-2 cannot express."""
    return FAMILIES["gpt2"].stock_config(config)


def read_gpt2_config(directory: Path) -> GPT2Config:
    """The GPT2Config of `directory`, with another model_type or wrongly typed fields reported as a ValueError."""
    path = Path(directory) / CONFIG_NAME
    fields = read_json(path)
    require_model_type(fields.get("model_type"), GPT2Config.model_type, path)
    try:
        return GPT2Config.from_dict(fields)
    except StrictDataclassError as error:  # a field of the wrong type; not a ValueError subclass
        raise ValueError(f"{path}: {error}") from error


def load_gpt2_as_glade(directory: Path) -> GladeForCausalLM:
    """A GPT-2 checkpoint folder as an in-memory Glade model (checked key by key and shape by shape)."""
    config = glade_config_from_gpt2(read_gpt2_config(directory))
    state_dict = gpt2_to_glade(load_state_dict_files(directory), config)
    return with_generation_config(model_from_state_dict(GladeForCausalLM, config, state_dict), directory)


def load_glade_as_gpt2(directory: Path) -> GPT2LMHeadModel:
    """A Glade checkpoint folder as an in-memory stock GPT-2 model."""
    return load_glade_as(directory, FAMILIES["gpt2"])


def convert_gpt2(
    source: str | Path, destination: str | Path, *, overwrite: bool = False, check: bool = False
) -> Conversion:
    """Convert a GPT-2 checkpoint (local folder or hub id) into a Glade checkpoint folder.

    With `check`, the parity report against the source (loaded by transformers' own `GPT2LMHeadModel`) is
    written beside the weights as parity_report.json and as a section of the model card (README.md).
    """
    directory = resolve_model_folder(source)
    model = load_gpt2_as_glade(directory)
    return save_conversion(
        model,
        Path(destination),
        overwrite=overwrite,
        tokenizer_dir=directory,
        reference=(lambda: GPT2LMHeadModel.from_pretrained(directory)) if check else None,
        source_name=str(source),
        source_dir=directory,
    )


def export_gpt2(
    source: str | Path, destination: str | Path, *, overwrite: bool = False, check: bool = False
) -> Conversion:
    """Export a GPT-2-shaped Glade checkpoint as a plain `GPT2LMHeadModel` folder (no custom code needed).

    The folder is for tools older than transformers 5 too: its tokenizer loads in transformers 4.4x-4.57, and its
    config carries `n_ctx`, which llama.cpp's convert_hf_to_gguf.py reads.
    """
    return export_glade(source, destination, load_glade_as_gpt2, overwrite=overwrite, check=check)
