"""`benchmarks/run.py --quick`: the report's structure and the facts it must get right. Never its speed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glade.hardware import native_bf16

pytestmark = pytest.mark.slow

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"
# --bf16 always: both dtypes, the one `glade pretrain` trains in on this CPU first.
DTYPES = ("bf16", "fp32") if native_bf16("cpu") else ("fp32", "bf16")
TRAIN_ROWS = [f"train-{shape}-{dtype}{suffix}" for shape in ("small", "124m") for dtype in DTYPES
              for suffix in ("", "-mfu")]
MEMORY_ROW = f"memory-train-small-{DTYPES[0]}"
ROWS = [*TRAIN_ROWS, "generate-b1", "generate-b1-bf16", "generate-b8", "prefill-64", MEMORY_ROW]


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OMP_WAIT_POLICY", None)  # OpenMP's default, as users get it
    return subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "report.json"
    result = run_benchmark("--quick", "--threads", "1", "--bf16", "always", "--json", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(path.read_text()), result.stdout


def test_report_records_machine_threads_and_load(quick_run):
    report, _ = quick_run
    assert report["quick"] is True
    assert report["command"].startswith("run.py --quick")
    assert report["threads"] == {"torch_num_threads": 1, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": None}
    assert {"cpu_model", "cpu_flags", "logical_cpus", "torch", "transformers"} <= report["machine"].keys()
    assert len(report["load_average"]["before"]) == len(report["load_average"]["after"]) == 3
    assert report["matmul_peak_tflops"]["bf16"] > 0 and report["matmul_peak_tflops"]["fp32"] > 0


def test_every_section_reports_gpt2_glade_and_their_ratio(quick_run):
    report, _ = quick_run
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ROWS
    for row in rows.values():
        assert row["values"]["gpt2"] > 0 and row["values"]["glade"] > 0
        assert row["ratios"]["glade/gpt2"] == pytest.approx(row["values"]["glade"] / row["values"]["gpt2"])
    # --quick leaves out compilation, so no "+compile" column may appear.
    assert not [name for row in rows.values() for name in row["values"] if name.endswith("+compile")]
    assert set(rows["train-small-bf16"]["values"]) == {"gpt2", "glade", "nanogpt"}
    assert rows["train-small-bf16"]["higher_is_better"] and not rows[MEMORY_ROW]["higher_is_better"]


def test_timings_are_alternating_samples_whose_median_is_reported(quick_run):
    report, _ = quick_run
    row = next(row for row in report["rows"] if row["name"] == "train-small-bf16")
    tokens = row["details"]["shape"]["batch"] * row["details"]["shape"]["seq_len"]
    for variant, samples in row["details"]["samples"].items():
        assert len(samples["wall_s"]) == len(samples["cpu_s"]) == 1
        assert row["values"][variant] == pytest.approx(tokens / samples["wall_s"][0])


def test_mfu_is_throughput_times_flops_over_the_measured_peak(quick_run):
    report, _ = quick_run
    rows = {row["name"]: row for row in report["rows"]}
    mfu = rows["train-124m-bf16-mfu"]
    flops = mfu["details"]["flops_per_token"]
    shape = rows["train-124m-bf16"]["details"]["shape"]
    c, layers, vocab, t = shape["n_embd"], shape["n_layer"], shape["vocab_size"], shape["seq_len"]
    assert flops == 6 * (12 * layers * c * c + vocab * c) + 12 * layers * t * c
    peak = report["matmul_peak_tflops"]["bf16"] * 1e12
    expected = 100 * rows["train-124m-bf16"]["values"]["glade"] * flops / peak
    assert mfu["values"]["glade"] == pytest.approx(expected)


def test_glade_greedy_tokens_match_gpt2(quick_run):
    report, _ = quick_run
    rows = [row for row in report["rows"] if row["name"].startswith("generate-")]
    assert [row["details"]["dtype"] for row in rows] == ["fp32", "bf16", "fp32"]
    for row in rows:
        agreement = row["details"]["token_agreement_with_gpt2"]
        assert agreement["gpt2"] == 1.0 and 0.0 <= agreement["glade"] <= 1.0
        if row["details"]["dtype"] == "fp32":  # bf16 rounding may flip a near tie between implementations
            assert row["details"]["tokens_identical_to_gpt2"] == {"gpt2": True, "glade": True}
            assert agreement["glade"] == 1.0


def test_memory_is_measured_per_process_above_the_weights(quick_run):
    report, _ = quick_run
    row = next(row for row in report["rows"] if row["name"] == MEMORY_ROW)
    for probe in row["details"].values():
        # Gradients plus two AdamW moments alone are 3x the parameters.
        assert probe["peak_mib"] >= 3 * probe["parameters_mib"]


def test_table_and_goals_are_printed(quick_run):
    report, stdout = quick_run
    header = stdout.splitlines()[0].split()
    assert header[:2] == ["benchmark", "unit"] and header[-1] == "glade/gpt2"
    assert [goal["row"] for goal in report["goals"]] == [
        "train-small-bf16", "train-124m-bf16", "train-124m-bf16-mfu", "train-small-fp32", "generate-b1",
        "generate-b1-bf16", MEMORY_ROW,
    ]
    for goal in report["goals"]:
        assert isinstance(goal["met"], bool)
        assert f"{goal['goal']}: {goal['variant']}" in stdout


def test_bf16_rows_follow_the_cpu_unless_asked_for(tmp_path):
    path = tmp_path / "report.json"
    result = run_benchmark("--quick", "--threads", "1", "--only", "train-small", "--json", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(path.read_text())
    assert report["machine"]["native_bf16"] is native_bf16("cpu")
    names = [row["name"] for row in report["rows"]]
    assert ("train-small-bf16" in names) is native_bf16("cpu") and "train-small-fp32" in names
    assert ("bf16 rows left out" in result.stdout) is not native_bf16("cpu")


def test_bad_thread_count_is_refused():
    result = run_benchmark("--threads", "0")
    assert result.returncode == 2
    assert "--threads must be at least 1, got 0" in result.stderr
