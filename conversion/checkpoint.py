"""Writing a converted model: weights, tokenizer files and (optionally) a parity report, all in one atomic step."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from transformers import AutoTokenizer, GenerationConfig, PreTrainedModel

from glade import GladeForCausalLM
from glade.atomic import atomic_directory
from glade.checkpoints import local_directory

from .io import WEIGHT_FILES, copy_tokenizer_files, make_tokenizer_config_portable
from .parity import ParityReport, compare_models, parity_batch, write_parity_report

# What a conversion needs from a hub repo; other formats (TF, Flax, ONNX) are skipped.
_HUB_METADATA = ["*.json", "merges.txt"]
_HUB_SAFETENSORS = ["model*.safetensors"]
_HUB_PICKLES = ["pytorch_model*.bin"]


@dataclass
class Conversion:
    """Where a conversion landed, which tokenizer files came with it, and its parity report when one was asked for."""

    destination: Path
    tokenizer_files: list[str] = field(default_factory=list)
    parity: ParityReport | None = None


def resolve_source(source: str | Path) -> Path:
    """A local checkpoint directory, or a hub id (`openai-community/gpt2`) downloaded with `snapshot_download`."""
    if (directory := local_directory(source)) is not None:
        return directory
    try:
        directory = Path(snapshot_download(repo_id=str(source), allow_patterns=_HUB_METADATA + _HUB_SAFETENSORS))
        if not any((directory / name).is_file() for name in WEIGHT_FILES):
            directory = Path(snapshot_download(repo_id=str(source), allow_patterns=_HUB_METADATA + _HUB_PICKLES))
    except (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise FileNotFoundError(f"{source!r} is neither a local directory nor a reachable hub repo: {error}") from error
    return directory


def with_generation_config(model: PreTrainedModel, directory: Path) -> PreTrainedModel:
    """`model`, carrying the generation defaults (eos id, sampling settings) of the checkpoint in `directory`."""
    if (Path(directory) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def export_glade(
    source: str,
    destination: str | Path,
    load: Callable[[Path], PreTrainedModel],
    *,
    overwrite: bool = False,
    check: bool = False,
) -> Conversion:
    """Save the stock model that `load` builds from the Glade checkpoint `source`, with a tokenizer config that
    transformers 4 loads too and, with `check`, a parity report against the Glade model."""
    directory = resolve_source(source)
    return save_conversion(
        load(directory),
        Path(destination),
        overwrite=overwrite,
        tokenizer_dir=directory,
        portable_tokenizer=True,
        reference=(lambda: GladeForCausalLM.from_pretrained(directory)) if check else None,
        reference_name=str(source),
    )


def save_conversion(
    model: PreTrainedModel,
    destination: Path,
    *,
    overwrite: bool = False,
    tokenizer_dir: Path | None = None,
    portable_tokenizer: bool = False,
    reference: Callable[[], PreTrainedModel] | None = None,
    reference_name: str = "source",
) -> Conversion:
    """Save `model` (with `save_pretrained`) and the tokenizer files of `tokenizer_dir` into `destination`.

    With `portable_tokenizer`, the tokenizer_config.json names a class that transformers 4 loads too. With
    `reference` (a loader for the model converted from), the saved checkpoint is reloaded and compared with it,
    and the report lands beside the weights before the folder is moved into place.
    """
    destination = Path(destination)
    with atomic_directory(destination, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer_files = copy_tokenizer_files(tokenizer_dir, staging) if tokenizer_dir is not None else []
        if portable_tokenizer:
            make_tokenizer_config_portable(staging)
        report = None
        if reference is not None:
            # Compare what was written, not what is in memory: the reload is the user's view of the result.
            converted = type(model).from_pretrained(staging)
            tokenizer = AutoTokenizer.from_pretrained(staging) if tokenizer_files else None
            batch = parity_batch(converted.config.vocab_size, converted.config.max_position_embeddings, tokenizer)
            report = compare_models(
                reference(), converted, batch, source_name=reference_name, converted_name=str(destination)
            )
            write_parity_report(report, staging)
    return Conversion(destination, tokenizer_files, report)
