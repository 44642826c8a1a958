"""The training log: `metrics.jsonl` (one JSON object per line) on the main process, mirrored to any Accelerate
tracker (`--report-to tensorboard`, ...).

Train records carry `step, train_loss, lr, grad_norm, tokens_seen, tokens_per_sec`; evaluation records
`step, tokens_seen, val_loss, val_ppl, val_bpb`. `read_metrics` reads them back, for the model card and the plots.
Every line is strict JSON: `lr` and `grad_norm` are null where they are not finite numbers (an infinite `--lr`, a
norm that overflowed) or not known; any other field that is not a finite number is refused rather than written.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from glade.atomic import write_text_atomically

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"
# Fields of records that must be numbers when present; evaluation records are those with `val_loss`.
NUMERIC_FIELDS = (
    "step", "train_loss", "lr", "grad_norm", "tokens_seen", "tokens_per_sec", "val_loss", "val_ppl", "val_bpb",
)
# Numeric fields that may be null: the training loop stops at a non-finite loss, but not for these.
NULLABLE_FIELDS = ("lr", "grad_norm")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl log, in order; a malformed line raises ValueError naming its number, except a
    last line cut off while it was appended, which is skipped with a warning (a resumed run rewrites the log)."""
    path = Path(path)
    records = []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    # Every record is appended with its newline: a last line without one was cut off (a full disk, a kill).
    torn = bool(text) and not text.endswith("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if torn and number == len(lines):
                logger.warning("%s, line %d: ignoring a record cut off while it was appended", path, number)
                break
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        for name in NUMERIC_FIELDS:
            value = record.get(name)
            if value is None and name in NULLABLE_FIELDS:
                continue
            if name in record and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{path}, line {number}: {name!r} must be a number, got {value!r}")
        records.append(record)
    return records


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The log's records, or none when there is no log yet."""
    return read_metrics(path) if Path(path).is_file() else []


class MetricsLog:
    """Appends records to `output_dir/metrics.jsonl`; inactive (a no-op) on processes other than the main one."""

    def __init__(self, output_dir: str | Path, accelerator, resume_step: int | None):
        self.path = Path(output_dir) / METRICS_FILENAME
        self.accelerator = accelerator
        self.active = accelerator.is_main_process
        if not self.active:
            return
        # A resumed run repeats the steps after its checkpoint: drop what the interrupted run logged for them.
        kept = [r for r in read_records(self.path) if resume_step is not None and r["step"] <= resume_step]
        write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {
            name: None if name in NULLABLE_FIELDS and value is not None and not math.isfinite(value) else value
            for name, value in record.items()
        }
        line = json.dumps(record, allow_nan=False)  # JSON has no NaN or Infinity: raise rather than write one
        with open(self.path, "a") as file:
            file.write(line + "\n")
        if self.accelerator.trackers:
            metrics = {k: v for k, v in record.items() if k != "step"}
            self.accelerator.log(metrics, step=record["step"])

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)
