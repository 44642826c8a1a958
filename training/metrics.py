"""The training log: `metrics.jsonl` (one JSON object per line) on the main process, mirrored to any Accelerate
tracker (`--report-to tensorboard`, ...).

Train records carry `step, train_loss, lr, grad_norm, tokens_seen, tokens_per_sec`; evaluation records
`step, tokens_seen, val_loss, val_ppl, val_bpb`. `glade.training.model_card` and `glade.training.plots` read them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glade.atomic import write_text_atomically
from .model_card import METRICS_FILENAME, read_metrics


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
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            metrics = {k: v for k, v in record.items() if k != "step"}
            self.accelerator.log(metrics, step=record["step"])

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)
