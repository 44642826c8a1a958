"""Writing a converted model: weights, tokenizer files, a model card and (optionally) a parity report, all in one
atomic step."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from transformers import AutoTokenizer, GenerationConfig, PreTrainedModel

from glade import GladeForCausalLM
from glade.atomic import atomic_directory
from glade.loading import local_directory
from glade.training.model_card import inherited_card_fields, write_model_card

from .io import WEIGHT_FILES, copy_tokenizer_files, make_tokenizer_config_portable
from .parity import ParityReport, compare_models, parity_batch, write_parity_report

# What a conversion needs from a hub repo (the card for its license and datasets); other formats (TF, Flax, ONNX) are
# skipped.
_HUB_METADATA = ["*.json", "merges.txt", "README.md"]
_HUB_SAFETENSORS = ["model*.safetensors"]
_HUB_PICKLES = ["pytorch_model*.bin"]


@dataclass
class Conversion:
    """Where a conversion landed, which tokenizer files came with it, and its parity report when one was asked for."""

    destination: Path
    tokenizer_files: list[str] = field(default_factory=list)
    parity: ParityReport | None = None


def resolve_model_folder(source: str | Path) -> Path:
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
    directory = resolve_model_folder(source)
    return save_conversion(
        load(directory),
        Path(destination),
        overwrite=overwrite,
        tokenizer_dir=directory,
        portable_tokenizer=True,
        reference=(lambda: GladeForCausalLM.from_pretrained(directory)) if check else None,
        source_name=str(source),
        source_dir=directory,
    )


def save_conversion(
    model: PreTrainedModel,
    destination: Path,
    *,
    source_name: str,
    overwrite: bool = False,
    tokenizer_dir: Path | None = None,
    portable_tokenizer: bool = False,
    reference: Callable[[], PreTrainedModel] | None = None,
    source_dir: Path | None = None,
) -> Conversion:
    """Save `model` (with `save_pretrained`), the tokenizer files of `tokenizer_dir` and a model card into
    `destination`.

    With `portable_tokenizer`, the tokenizer_config.json names a class that transformers 4 loads too. With
    `reference` (a loader for the model converted from), the saved checkpoint is reloaded and compared with it,
    and the report lands beside the weights and in the card before the folder is moved into place. The card says
    what the folder was converted from (`source_name`) and keeps what still holds of the card and training log in
    `source_dir`, the folder converted from.
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
                reference(), converted, batch, source_name=source_name, converted_name=str(destination)
            )
            write_parity_report(report, staging)
        write_model_card(
            staging,
            model_name=destination.name,
            converted_from=source_name,
            parity_report=report,
            **inherited_card_fields(source_dir),
        )
    return Conversion(destination, tokenizer_files, report)
