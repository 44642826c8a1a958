import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glade import GladeConfig
from glade.cli import main as glade_main
from glade.training.metrics import read_records
from glade.training.resuming import architecture, check_same_architecture
from glade.training.pretrain import PretrainConfig, pretrain

pytestmark = pytest.mark.slow

N = 8  # steps before the checkpoint; runs go to 2N


def train_losses(output_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def logged_steps(output_dir) -> list[int]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if "train_loss" in line]


def wait_for(condition, process, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited ({process.returncode}) before {what}:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def speeches(text_file: Path, tmp_path: Path) -> Path:
    path = tmp_path / "speeches.jsonl"
    texts = [text for text in text_file.read_text().split("\n\n") if text.strip()]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


# Every option of recipe v2 that holds state or moves the data: resumed mid-ramp, in the first epoch's order.
RECIPE_V2 = {"optimizer": "muon", "polar_express": True, "normuon": True, "cautious_weight_decay": True,
             "weight_decay_schedule": "linear", "shuffle_documents": True, "grad_accum": 3, "batch_ramp_steps": N + 2}


@pytest.mark.parametrize(
    "training",
    [{"optimizer": "adamw"}, {"optimizer": "muon"}, {"optimizer": "adamw", "ema_decay": 0.9}, RECIPE_V2],
    ids=["adamw", "muon", "adamw-ema", "recipe-v2-options"],
)
def test_resume_after_sigkill_is_bitwise_identical_to_an_uninterrupted_run(
    training, base_options, argv, pretrain_subprocess, training_env, tmp_path
):
    # Dropout on, so the resumed run must also restore the RNG states to match. With --ema-decay, final/ is the
    # weight average, and with --normuon the optimizer holds running mean squares: the checkpoint must carry both;
    # a scheduled weight decay, shuffled documents and a batch ramp must resume at their step.
    options = {**base_options, "max_steps": 2 * N, "save_every": N, "keep_last": 0, "eval_every": N,
               "dropout": 0.1, "mixed_precision": "bf16", **training}
    if training.get("shuffle_documents"):  # documents to shuffle: the fixture's speeches, one per JSON line
        options["data"] = [speeches(base_options["data"][0], tmp_path)]
    straight = tmp_path / "straight"
    pretrain_subprocess({**options, "output_dir": straight})

    interrupted = tmp_path / "interrupted"
    kill_after = N + random.randint(0, N - 2)
    print(f"killing the run once step {kill_after} is logged")  # shown on failure, to reproduce
    process = subprocess.Popen(
        [sys.executable, "-m", "glade.training.pretrain", *argv({**options, "output_dir": interrupted})],
        env=training_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: (interrupted / f"checkpoint-{N}" / "COMPLETE").exists(), process, f"checkpoint-{N}")
        wait_for(lambda: max(logged_steps(interrupted), default=0) >= kill_after, process, f"step {kill_after}")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / f"checkpoint-{2 * N}").exists() and not (interrupted / "final").exists()

    pretrain_subprocess({**options, "output_dir": interrupted, "resume": "latest"})

    expected, resumed = train_losses(straight), train_losses(interrupted)
    assert list(resumed) == list(range(1, 2 * N + 1))
    assert resumed == expected  # exact float equality, step by step
    straight_weights = load_file(straight / "final" / "model.safetensors")
    resumed_weights = load_file(interrupted / "final" / "model.safetensors")
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        assert tensor.equal(resumed_weights[name]), name
    val_records = [line for line in (straight / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert val_records == [line for line in (interrupted / "metrics.jsonl").read_text().splitlines()
                           if "val_loss" in line]


# Runs pretraining, but SIGKILLs itself just before the COMPLETE marker of checkpoint 4 would be written.
DIE_WHILE_SAVING = textwrap.dedent(
    """
    import os, signal, sys
    import glade.training.checkpointing as checkpoint
    write_marker = checkpoint.write_marker
    def die_before_marker(directory, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        write_marker(directory, step)
    checkpoint.write_marker = die_before_marker
    from glade.training.pretrain import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_run_killed_while_saving_resumes_from_the_previous_checkpoint(
    base_options, argv, training_env, capsys, fresh_accelerate
):
    options = {**base_options, "max_steps": 4, "save_every": 2, "keep_last": 0}
    output = options["output_dir"]
    result = subprocess.run([sys.executable, "-c", DIE_WHILE_SAVING, *argv(options)], env=training_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert (output / "checkpoint-2" / "COMPLETE").exists()
    assert (output / ".checkpoint-4.tmp" / "model.safetensors").exists()  # the state was written, the marker not
    assert not (output / "checkpoint-4").exists()
    assert logged_steps(output) == [1, 2, 3, 4]

    assert glade_main(["pretrain", *argv({**options, "resume": "latest"})]) == 0
    assert f"resumed from {output / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert (output / "checkpoint-4" / "COMPLETE").exists() and (output / "final" / "model.safetensors").exists()
    assert not (output / ".checkpoint-4.tmp").exists()
    assert logged_steps(output) == [1, 2, 3, 4]  # what the killed run logged after step 2 was replaced

    # Resuming with a different global batch would not continue on the same data: refused, naming why.
    with pytest.raises(SystemExit):
        glade_main(["pretrain", *argv({**options, "max_steps": 6, "batch_size": 2, "resume": "latest"})])
    assert "the global batch (batch size x grad accum x processes) changed (global_batch_blocks was 4, now 2)" in (
        capsys.readouterr().err
    )


def test_one_run_per_output_directory_even_without_its_lock_file_and_a_killed_runs_lock_does_not_block_resume(
    base_options, argv, pretrain_subprocess, training_env
):
    options = {**base_options, "max_steps": 100_000, "save_every": 5, "keep_last": 1}
    output = options["output_dir"]
    command = [sys.executable, "-m", "glade.training.pretrain"]
    first = subprocess.Popen([*command, *argv(options)], env=training_env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: list(output.glob("checkpoint-*/COMPLETE")), first, "the first checkpoint")
        # A new run, and a resume after someone deleted .lock, while the first one trains.
        for second, holder in (({}, first.pid), ({"resume": "latest"}, "unknown")):
            if second:
                (output / ".lock").unlink()
            refused = subprocess.run([*command, *argv({**options, **second})], env=training_env,
                                     capture_output=True, text=True, timeout=120)
            assert refused.returncode == 2, refused.stderr[-3000:]
            assert (f"glade pretrain: error: output directory {output} is in use by another glade pretrain run "
                    f"(process {holder})") in refused.stderr
            assert first.poll() is None  # and the first one trains on
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()

    # The killed run's lock went with it.
    resume_at = max(int(path.name.split("-")[1]) for path in output.glob("checkpoint-*"))
    result = pretrain_subprocess({**options, "max_steps": resume_at + 2, "resume": "latest"})
    assert f"resumed from {output / f'checkpoint-{resume_at}'} at step {resume_at}" in result.stdout
    assert (output / "final" / "model.safetensors").exists()


def test_a_resumed_run_applies_its_own_learning_rates_and_weight_decay(base_options, fresh_accelerate):
    options = {**base_options, "max_steps": 4, "save_every": 2, "keep_last": 0, "optimizer": "muon",
               "lr": 3e-3, "muon_lr": 0.02, "weight_decay": 0.1}
    output = options["output_dir"]
    pretrain(PretrainConfig(**options))
    first_lrs = {r["step"]: r["lr"] for r in read_records(output / "metrics.jsonl") if "lr" in r}
    fresh_accelerate()

    changed = {"lr": 6e-3, "muon_lr": 0.01, "weight_decay": 0.05}
    pretrain(PretrainConfig(**{**options, **changed, "resume": str(output / "checkpoint-2")}))
    lrs = {r["step"]: r["lr"] for r in read_records(output / "metrics.jsonl") if "lr" in r}
    assert lrs[1] == first_lrs[1] and lrs[2] == first_lrs[2]
    assert lrs[3] == pytest.approx(2 * first_lrs[3]) and lrs[4] == pytest.approx(2 * first_lrs[4])
    # The optimizer state saved at step 4 holds the new values, for AdamW's groups and Muon's alike.
    adamw, muon = (optimizer["param_groups"] for optimizer in
                   torch.load(output / "checkpoint-4" / "optimizer.bin", weights_only=True)["optimizers"])
    assert [(group["initial_lr"], group["weight_decay"]) for group in adamw] == [(6e-3, 0.05), (6e-3, 0.0)]
    assert {(group["initial_lr"], group["weight_decay"]) for group in muon} == {(0.01, 0.05)}
    card = (output / "final" / "README.md").read_text()
    assert "| lr | 0.006 |" in card and "| muon_lr | 0.01 |" in card and "| weight_decay | 0.05 |" in card


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in glade catches it, and nothing after it runs."""


def test_resume_latest_follows_the_run_resumed_from_an_older_checkpoint(
    base_options, argv, capsys, monkeypatch, fresh_accelerate
):
    import glade.training.pretrain as pretrain_module

    options = {**base_options, "max_steps": 6, "save_every": 2, "keep_last": 0}
    output = options["output_dir"]
    pretrain(PretrainConfig(**options))  # run A: checkpoints 2, 4, 6 and final/
    fresh_accelerate()

    # Run B branches from A's step 2 with another learning rate and is killed at step 3, before it saves anything.
    steps = []
    real_step = pretrain_module.optimizer_step

    def step_then_die(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            raise Killed
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "optimizer_step", step_then_die)
    with pytest.raises(Killed):
        pretrain(PretrainConfig(**{**options, "lr": 1e-3, "resume": str(output / "checkpoint-2")}))
    monkeypatch.setattr(pretrain_module, "optimizer_step", real_step)
    fresh_accelerate()
    capsys.readouterr()

    # A's later saves are out of the way, kept: latest is B's branch point, not A's abandoned step 6.
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2"]
    (abandoned,) = (output / "abandoned").iterdir()
    assert sorted(path.name for path in abandoned.iterdir()) == ["checkpoint-4", "checkpoint-6", "final"]
    assert glade_main(["pretrain", *argv({**options, "lr": 1e-3, "resume": "latest"})]) == 0
    assert f"resumed from {output / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert json.loads((output / "final" / "COMPLETE").read_text())["step"] == 6
    lrs = {r["step"]: r["lr"] for r in read_records(output / "metrics.jsonl") if "lr" in r}
    abandoned_lrs = {r["step"]: r["lr"] for r in read_records(abandoned / "final" / "metrics.jsonl") if "lr" in r}
    assert lrs[2] == abandoned_lrs[2] and lrs[4] == pytest.approx(abandoned_lrs[4] / 3)  # B's schedule, not A's


@pytest.fixture
def saved_at_step_2(base_options, fresh_accelerate) -> dict:
    options = {**base_options, "max_steps": 2, "save_every": 2, "keep_last": 0}
    pretrain(PretrainConfig(**options))
    fresh_accelerate()
    return {**options, "max_steps": 4, "resume": "latest"}


def refusal(options: dict, argv, capsys) -> str:
    with pytest.raises(SystemExit):
        glade_main(["pretrain", *argv(options)])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_resume_refuses_an_architecture_change_that_keeps_every_shape(saved_at_step_2, argv, capsys, tmp_path):
    config = json.loads(saved_at_step_2["config"].read_text())
    changed = tmp_path / "softcapped.json"
    changed.write_text(json.dumps({**config, "logit_softcap": 30.0, "layer_norm_epsilon": 1e-6}))
    line = refusal({**saved_at_step_2, "config": changed}, argv, capsys)
    assert "the model architecture changed (layer_norm_epsilon was 1e-05, now 1e-06; logit_softcap was None, now " \
           "30.0)" in line


def test_the_recorded_architecture_holds_the_rotation_and_older_records_still_match():
    rotary = GladeConfig(n_embd=64, n_head=4, positions="rotary", rope_parameters={"rope_theta": 500.0})
    recorded = architecture(rotary)
    assert recorded["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}
    assert "rope_parameters" not in architecture(GladeConfig())
    before_partial_rotation = {**recorded, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
    check_same_architecture(Path("checkpoint-2"), before_partial_rotation, recorded)
    # Fields added since (norm_gain, embedding_norm, residual_lambdas) count as their defaults in older records.
    before_new_fields = {name: value for name, value in recorded.items()
                         if name not in ("norm_gain", "embedding_norm", "residual_lambdas")}
    check_same_architecture(Path("checkpoint-2"), before_new_fields, recorded)
    with_lambdas = architecture(GladeConfig(n_embd=64, n_head=4, positions="rotary", residual_lambdas=True,
                                            rope_parameters={"rope_theta": 500.0}))
    with pytest.raises(ValueError, match="residual_lambdas was False, now True"):
        check_same_architecture(Path("checkpoint-2"), before_new_fields, with_lambdas)
    other_theta = architecture(GladeConfig(n_embd=64, n_head=4, positions="rotary"))
    with pytest.raises(ValueError, match="rope_parameters was .*'rope_theta': 500.0.*now .*'rope_theta': 10000.0"):
        check_same_architecture(Path("checkpoint-2"), recorded, other_theta)


def test_resume_refuses_a_changed_weight_average(saved_at_step_2, argv, capsys):
    line = refusal({**saved_at_step_2, "ema_decay": 0.99}, argv, capsys)
    assert "it was trained with --ema-decay 0.0, not --ema-decay 0.99" in line


def test_resume_refuses_a_changed_document_shuffle(saved_at_step_2, argv, capsys):
    line = refusal({**saved_at_step_2, "shuffle_documents": True}, argv, capsys)
    assert "it was trained with --shuffle-documents False, not True, so the run would not continue on the same data" \
        in line


def test_resume_refuses_to_add_or_drop_normuon_state(saved_at_step_2, argv, capsys):
    checkpoint = saved_at_step_2["output_dir"] / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "optimizer": "muon"}))
    regenerate_manifest(checkpoint)
    line = refusal({**saved_at_step_2, "optimizer": "muon", "normuon": True}, argv, capsys)
    assert "it was trained without --normuon; resume it the same way" in line


def regenerate_manifest(checkpoint) -> None:
    """What a careful tamperer does: the checkpoint verifies again."""
    from glade.manifest import write_manifest

    manifest = json.loads((checkpoint / "COMPLETE").read_text())
    write_manifest(checkpoint, step=manifest["step"])


def test_a_checkpoint_of_another_shape_is_one_line_even_without_its_recorded_architecture(
    saved_at_step_2, argv, capsys, tmp_path
):
    checkpoint = saved_at_step_2["output_dir"] / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["architecture"]  # as a checkpoint from before it was recorded
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    regenerate_manifest(checkpoint)
    config = json.loads(saved_at_step_2["config"].read_text())
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**config, "n_embd": 2 * config["n_embd"]}))
    line = refusal({**saved_at_step_2, "config": wider}, argv, capsys)
    assert f"cannot resume from {checkpoint}: it does not fit this run's model and optimizer (" in line
    assert "size mismatch for transformer.wte.weight" in line


def test_a_tampered_trainer_state_with_a_regenerated_manifest_is_one_line(saved_at_step_2, argv, capsys):
    checkpoint = saved_at_step_2["output_dir"] / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["seed"], state["tokens_seen"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    regenerate_manifest(checkpoint)
    line = refusal(saved_at_step_2, argv, capsys)
    assert line.endswith(f"cannot resume from {checkpoint}: its trainer_state.json lacks tokens_seen, seed")
