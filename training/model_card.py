"""Model cards for the folders Glade writes: a README.md whose YAML header drives the Hub and whose body tells people
how to load, what went into training, and how well it did.

Every card Glade writes comes from `write_model_card`: a training run's `final/`, a conversion or export (with its
parity report as a section), and the card `glade push` writes for a folder that has none. A Glade checkpoint's card
loads it with `import glade` or remote code; a stock transformers folder's (`glade export gpt2|stock`) with
transformers alone. The card is rendered from the template `model_cards/templates/glade_card.md` (installed as
package data of `glade.model_cards`), through `huggingface_hub.ModelCard`, so the metadata is exactly what
`ModelCard.load` parses back.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from glade import GladeConfig
from glade.atomic import write_bytes_atomically
from glade.param_count import format_count

from .metrics import METRICS_FILENAME, read_metrics

logger = logging.getLogger(__name__)

TEMPLATE = files("glade.model_cards") / "templates" / "glade_card.md"
CARD_NAME = "README.md"
LOSS_CURVE = "loss_curve.png"
TAGS = ["glade", "gpt2", "custom_code", "text-generation"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

EVAL_METRICS = {  # record field -> (model-index metric type, pretty name)
    "val_loss": ("loss", "Validation loss (nats/token)"),
    "val_ppl": ("perplexity", "Validation perplexity"),
    "val_bpb": ("bits_per_byte", "Validation bits per byte"),
}

SampleGeneration = tuple[str, Mapping[str, Any] | str | None, str]  # (prompt, sampling settings, generated text)


class MarkdownSection(Protocol):
    """A report that renders itself as a card section (a conversion's `ParityReport`)."""

    def to_markdown(self) -> str: ...


ParityChecks = Mapping[str, Any] | str | Path | MarkdownSection


def write_model_card(
    model_dir: str | Path,
    metrics_path: str | Path | None = None,
    *,
    model_name: str | None = None,
    repo_id: str | None = None,
    dataset_names: Sequence[str] = (),
    license: str = "apache-2.0",
    language: str | Sequence[str] | None = None,
    base_model: str | None = None,
    converted_from: str | None = None,
    training_args: Mapping[str, Any] | None = None,
    sample_generations: Sequence[SampleGeneration] | None = None,
    loss_curve_png: str | Path | None = None,
    parity_report: ParityChecks | None = None,
    details: str | None = None,
    limitations: Sequence[str] = (),
    more_results: Sequence[EvalResult] = (),
) -> Path:
    """Render `model_dir/README.md` for a saved Glade checkpoint, or a stock transformers one exported from Glade,
    and return its path.

    Args:
        model_dir: a `save_pretrained` directory of a Glade model or of a stock transformers causal LM.
        metrics_path: the training log (JSON lines); defaults to `model_dir/metrics.jsonl` when that exists, and
            without a log the card simply has no results. The last record with `val_loss` becomes the model-index.
        model_name: the card's title and model-index name; defaults to the name part of `repo_id`, else the
            directory name.
        repo_id: the Hub id the usage snippets load; defaults to `model_name`.
        dataset_names: Hub dataset ids the model was trained on.
        base_model: Hub id of the checkpoint training continued from, if any.
        converted_from: the checkpoint (path or Hub id) this folder was converted from, if it was.
        training_args: hyperparameters, shown as a table.
        sample_generations: `(prompt, settings, text)` triples; settings is a dict of sampling options or a string.
        loss_curve_png: a PNG plot, copied into the model directory as `loss_curve.png` and embedded.
        parity_report: checks against a reference implementation: name -> value (a table), a JSON file holding
            them, or a report with a `to_markdown()` section (a conversion's parity report).
        details: Markdown about this particular model (data and licenses, tokenizer, hardware, comparisons), placed
            after the overview.
        limitations: model-specific limitations, listed before the generic ones.
        more_results: evaluations beyond the training log's (e.g. an lm-evaluation-harness task), added to the
            model-index.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: save the model with save_pretrained first")
    config = AutoConfig.from_pretrained(model_dir)  # `import glade` registered Glade's, so no remote code runs
    glade = isinstance(config, GladeConfig)
    model = _weightless_model(config)
    parameters = sum(parameter.numel() for parameter in model.parameters())  # tied ones once
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else model_dir.resolve().name)

    if metrics_path is None and (model_dir / METRICS_FILENAME).is_file():
        metrics_path = model_dir / METRICS_FILENAME
    records = read_metrics(metrics_path) if metrics_path is not None else []
    train = next((r for r in reversed(records) if "train_loss" in r), None)
    evaluation = next((r for r in reversed(records) if "val_loss" in r), None)

    card_data = ModelCardData(
        model_name=model_name,
        license=license,
        language=language,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=TAGS if glade else ["glade", config.model_type, "text-generation"],
        datasets=list(dataset_names) or None,
        base_model=base_model,
        eval_results=[*(_eval_results(evaluation, dataset_names) if evaluation else ()), *more_results] or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE.read_text(encoding="utf-8"),
        model_name=model_name,
        repo_id=repo_id or model_name,
        config=config,
        glade=glade,
        architecture=type(model).__name__,
        converted_from=converted_from,
        parameters=f"{format_count(parameters)} ({parameters:,})",
        train=train,
        evaluation=evaluation,
        hyperparameters=_table_rows(training_args or {}),
        loss_curve=_copy_loss_curve(loss_curve_png, model_dir) if loss_curve_png is not None else None,
        **_parity_views(parity_report),
        samples=[_sample_view(*sample) for sample in sample_generations or ()],
        details=details,
        limitations=list(limitations),
    )
    readme = model_dir / CARD_NAME
    write_bytes_atomically(readme, card.content.encode("utf-8"))
    return readme


def inherited_card_fields(source_dir: Path | None) -> dict[str, Any]:
    """The `write_model_card` arguments a folder converted from `source_dir` keeps of its source: the training log,
    and the license, languages and datasets the source's card declares. The weights compute the same function, so
    they still hold."""
    fields: dict[str, Any] = {}
    if source_dir is None:
        return fields
    if (source_dir / METRICS_FILENAME).is_file():
        fields["metrics_path"] = source_dir / METRICS_FILENAME
    if (source_dir / CARD_NAME).is_file():
        try:
            metadata = metadata_load(source_dir / CARD_NAME) or {}
        except yaml.YAMLError as error:  # a broken source card must not stop the conversion
            logger.warning("%s: ignoring its unreadable YAML header (%s)", source_dir / CARD_NAME, error)
            metadata = {}
        fields |= {
            argument: metadata[key]
            for argument, key in (("license", "license"), ("language", "language"), ("dataset_names", "datasets"))
            if metadata.get(key)
        }
        if isinstance(fields.get("dataset_names"), str):  # YAML allows one dataset without a list
            fields["dataset_names"] = [fields["dataset_names"]]
    return fields


def _weightless_model(config: PreTrainedConfig) -> PreTrainedModel:
    """The causal LM `config` describes, built on the meta device: its class and parameter count, without weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _eval_results(record: Mapping[str, Any], dataset_names: Sequence[str]) -> list[EvalResult]:
    dataset = " + ".join(dataset_names) or "training corpus"
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Causal language modeling",
            dataset_type=dataset_names[0] if dataset_names else "custom",
            dataset_name=f"{dataset} (held-out validation split)",
            dataset_split="validation",
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=float(record[field]),
        )
        for field, (metric_type, metric_name) in EVAL_METRICS.items()
        if field in record
    ]


def _parity_views(report: ParityChecks | None) -> dict[str, Any]:
    """The template's two renderings of parity checks: a check -> value table, or the report's own section."""
    if hasattr(report, "to_markdown"):
        return {"parity": [], "parity_section": report.to_markdown()}
    return {"parity": _table_rows(_load_parity(report)), "parity_section": None}


def _load_parity(report: Mapping[str, Any] | str | Path | None) -> Mapping[str, Any]:
    if report is None or isinstance(report, Mapping):
        return report or {}
    loaded = json.loads(Path(report).read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError(f"parity report {report} must hold a JSON object of check name -> value")
    return loaded


def _copy_loss_curve(source: str | Path, model_dir: Path) -> str:
    source, target = Path(source), model_dir / LOSS_CURVE
    data = source.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"loss curve {source} is not a PNG file")
    if source.resolve() != target.resolve():
        write_bytes_atomically(target, data)
    return LOSS_CURVE


def _sample_view(prompt: str, settings: Mapping[str, Any] | str | None, text: str) -> dict[str, str]:
    if isinstance(settings, Mapping):
        settings = ", ".join(f"{name}={value}" for name, value in settings.items())
    # Delimiters longer than any backtick run inside, so generated backticks cannot end the code early.
    ticks = "`" * (_longest_backtick_run(prompt) + 1)
    pad = " " if prompt.startswith("`") or prompt.endswith("`") else ""  # CommonMark strips one space each side
    return {
        "prompt": f"{ticks}{pad}{prompt}{pad}{ticks}",
        "settings": settings or "default settings",
        "text": text,
        "fence": "`" * max(3, _longest_backtick_run(text) + 1),
    }


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _table_rows(mapping: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(_table_cell(name), _table_cell(value)) for name, value in mapping.items()]


def _table_cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(map(str, value))
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")
