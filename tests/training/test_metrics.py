import math
from types import SimpleNamespace

import pytest

from glade.training.metrics import MetricsLog, read_metrics


def test_the_log_is_strict_json_with_null_for_an_unknown_lr_or_gradient_norm(tmp_path):
    log = MetricsLog(tmp_path, SimpleNamespace(is_main_process=True, trackers=[]), resume_step=None)
    log.log({"step": 1, "train_loss": 5.0, "lr": math.nan, "grad_norm": math.inf, "tokens_seen": 64})
    log.log({"step": 2, "train_loss": 4.0, "lr": 1e-3, "grad_norm": None, "tokens_seen": 128})
    first_line = log.path.read_text().splitlines()[0]
    assert first_line == '{"step": 1, "train_loss": 5.0, "lr": null, "grad_norm": null, "tokens_seen": 64}'
    assert [(r["lr"], r["grad_norm"]) for r in read_metrics(log.path)] == [(None, None), (1e-3, None)]
    # A loss is never null: the training loop stops first, and the log refuses rather than writes bare NaN.
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        log.log({"step": 3, "train_loss": math.nan})
    assert len(read_metrics(log.path)) == 2
    (tmp_path / "other.jsonl").write_text('{"step": 1, "train_loss": null}\n')
    with pytest.raises(ValueError, match="'train_loss' must be a number, got None"):
        read_metrics(tmp_path / "other.jsonl")


def test_a_record_cut_off_while_appended_is_skipped_and_dropped_on_resume(tmp_path, caplog):
    main = SimpleNamespace(is_main_process=True, trackers=[])
    log = MetricsLog(tmp_path, main, resume_step=None)
    for step in (1, 2):
        log.log({"step": step, "train_loss": 5.0 - step, "tokens_seen": 64 * step})
    with open(log.path, "a") as file:
        file.write('{"step": 3, "train_lo')  # the disk filled, or the run was killed, mid-append
    with caplog.at_level("WARNING", logger="glade.training.metrics"):
        assert [r["step"] for r in read_metrics(log.path)] == [1, 2]
    assert "line 3: ignoring a record cut off while it was appended" in caplog.text
    MetricsLog(tmp_path, main, resume_step=2)  # --resume rewrites the log up to its checkpoint
    assert log.path.read_text().endswith('"tokens_seen": 128}\n')

    (tmp_path / "damaged.jsonl").write_text('{"step": 1, "train_lo\n{"step": 2, "train_loss": 3.0}\n')
    with pytest.raises(ValueError, match="line 1: not valid JSON"):  # damage before the end is not a torn append
        read_metrics(tmp_path / "damaged.jsonl")
