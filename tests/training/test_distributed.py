import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from glade import REMOTE_CODE_FILES, GladeForCausalLM
from glade.cli import main as glade_main

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "accelerate_configs"
STEPS = 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def blocks_per_step(samples_file) -> dict[int, list[int]]:
    return {r["step"]: [i for micro in r["blocks"] for i in micro] for r in read_jsonl(samples_file)}


def launch_command(launch_args: list[str], options: dict, argv, script: Path | None = None) -> list[str]:
    target = [str(script)] if script else ["-m", "glade.training.pretrain"]
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--main_process_port",
            str(free_port()), *target, *argv(options)]


def accelerate_launch(launch_args: list[str], options: dict, argv, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(launch_command(launch_args, options, argv), env=env, capture_output=True, text=True,
                            timeout=400)
    if result.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({result.returncode}):\n{result.stderr[-5000:]}")
    return result


def compare_with_single_process(distributed: Path, single: Path, tolerance: float) -> None:
    """Same global batch, same blocks per step: same losses and weights up to reduction order."""
    runs = [read_jsonl(run / "metrics.jsonl") for run in (distributed, single)]
    for field in ("train_loss", "grad_norm"):  # the gradient's scale too, which Adam alone would hide
        values = [[r[field] for r in records if "train_loss" in r] for records in runs]
        assert len(values[0]) == STEPS
        torch.testing.assert_close(values[0], values[1], rtol=tolerance, atol=0, msg=field)
    validation = [[r["val_loss"] for r in records if "val_loss" in r] for records in runs]
    torch.testing.assert_close(validation[0], validation[1], rtol=tolerance, atol=0)
    weights = [load_file(run / "final" / "model.safetensors") for run in (distributed, single)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=tolerance, msg=name)


@pytest.fixture
def single_process_run(base_options, argv, fresh_accelerate, tmp_path):
    """The reference: one process, the whole global batch of 4 blocks per step."""
    options = {**base_options, "max_steps": STEPS, "batch_size": 4, "record_samples": True,
               "output_dir": tmp_path / "single"}
    assert glade_main(["pretrain", *argv(options)]) == 0
    return options["output_dir"]


# Two CPU processes over gloo. `accelerate launch --cpu` starts a single process unless mpirun is configured; a
# torchrun-style launch with ACCELERATE_USE_CPU gives DDP, and the shipped fsdp_cpu.yaml gives FSDP2.
DDP = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
       "--dynamo_backend", "no"]
FSDP = ["--config_file", str(CONFIGS / "fsdp_cpu.yaml")]
# DeepSpeed is not a dependency: `pip install deepspeed` (its CPU accelerator, gloo) runs these rows too.
DEEPSPEED = ["--config_file", str(CONFIGS / "deepspeed_zero2.yaml"), "--num_processes", "2", "--mixed_precision", "no"]
LAUNCHERS = {
    "ddp": (DDP, "MULTI_CPU"),
    "fsdp": (FSDP, "FSDP"),
    "fsdp-no-reshard": ([*FSDP, "--fsdp_reshard_after_forward", "false"], "FSDP"),
    "deepspeed-zero2": (DEEPSPEED, "DEEPSPEED"),
}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def launchers(*names: str) -> list:
    return [pytest.param(name, marks=needs_deepspeed) if name.startswith("deepspeed") else name for name in names]


def launch_env(launcher: str, training_env: dict) -> dict:
    return {**training_env, "ACCELERATE_USE_CPU": "true"} if launcher == "ddp" else training_env


def gathered_checkpoint_weights(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The full model weights a checkpoint holds: one file under DDP, merged from the rank shards under FSDP."""
    if (checkpoint / "model.safetensors").is_file():
        return load_file(checkpoint / "model.safetensors")
    if (checkpoint / "pytorch_model").is_dir():  # DeepSpeed's ZeRO partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return {name: tensor.contiguous() for name, tensor in
                get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model").items()}
    shards = checkpoint / "pytorch_model_fsdp_0"
    from accelerate.utils import merge_fsdp_weights

    merge_fsdp_weights(str(shards), str(tmp_path / "merged"))
    return load_file(tmp_path / "merged" / "model.safetensors")


def check_single_export(output: Path, stdout: str, stderr: str, distributed_type: str) -> None:
    """One process wrote the shared files and printed the progress; no staging directory is left behind."""
    assert stdout.count("glade pretrain: 2 process(es)") == 1
    assert f"2 process(es), {distributed_type}" in stdout
    assert stdout.count("saved ") == 1 and len(re.findall(r"\| 0/\d+ \[[^]]*step/s\]", stderr)) == 1  # one step bar
    assert [p.name for p in output.iterdir() if p.name.startswith(".")] == [".lock"]
    final = output / "final"
    assert {p.name for p in final.iterdir()} == {
        "COMPLETE", "README.md", "config.json", "generation_config.json", "loss_curve.png", "metrics.jsonl",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json", *REMOTE_CODE_FILES}
    auto_map = json.loads((final / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_glade.GladeForCausalLM"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", launchers(*LAUNCHERS))
def test_two_cpu_processes_shard_the_data_match_one_process_and_export_once(
    launcher, base_options, argv, training_env, single_process_run, tmp_path
):
    launch_args, distributed_type = LAUNCHERS[launcher]
    output = tmp_path / launcher
    options = {**base_options, "max_steps": STEPS, "batch_size": 2, "record_samples": True, "output_dir": output,
               "save_every": STEPS // 2, "keep_last": 0}
    result = accelerate_launch(launch_args, options, argv, launch_env(launcher, training_env))
    check_single_export(output, result.stdout, result.stderr, distributed_type)

    ranks = [blocks_per_step(output / "samples" / f"rank-{rank}.jsonl") for rank in (0, 1)]
    single = blocks_per_step(single_process_run / "samples" / "rank-0.jsonl")
    assert list(ranks[0]) == list(ranks[1]) == list(range(STEPS))  # every rank ran every step
    for step in range(STEPS):
        assert len(ranks[0][step]) == len(ranks[1][step]) == 2
        assert not set(ranks[0][step]) & set(ranks[1][step])  # disjoint shards
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(single[step])  # together: the same global batch
    checkpoint = output / f"checkpoint-{STEPS}"
    assert {p.name for p in checkpoint.glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}  # every rank's RNG is checkpointed
    if distributed_type == "FSDP":  # each rank wrote its own shard of the model and of the optimizer state
        assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
        assert len(list((checkpoint / "optimizer_0").glob("*.distcp"))) == 2
    compare_with_single_process(output, single_process_run, tolerance=1e-4)

    # final/ is exactly the gathered parameters of the last step, and loads as a plain Glade model.
    # The tied head is saved once, as its embedding (the sharded checkpoint keeps both names).
    exported = load_file(output / "final" / "model.safetensors")
    gathered = gathered_checkpoint_weights(checkpoint, tmp_path)
    gathered.setdefault("lm_head.weight", gathered["transformer.wte.weight"])
    assert set(gathered) - set(exported) == {"lm_head.weight"}
    model = AutoModelForCausalLM.from_pretrained(output / "final")
    assert type(model) is GladeForCausalLM and model.lm_head.weight is model.transformer.wte.weight
    assert model.state_dict().keys() == gathered.keys()
    for name, tensor in model.state_dict().items():
        assert tensor.equal(gathered[name]), name


@pytest.mark.slow
def test_a_launch_into_a_folder_in_use_stops_on_every_rank(base_options, argv, training_env, tmp_path):
    from glade.training.output_dir import RunLock

    output = tmp_path / "busy"
    output.mkdir()
    lock = RunLock(output)  # held by this process, as by another run's main process
    try:
        result = subprocess.run(
            launch_command(DDP, {**base_options, "max_steps": STEPS, "output_dir": output}, argv),
            env=launch_env("ddp", training_env), capture_output=True, text=True, timeout=120,
        )
    finally:
        lock.close()
    assert result.returncode != 0
    refusal = (f"glade pretrain: error: output directory {output} is in use by another glade pretrain run "
               f"(process {os.getpid()})")
    assert result.stderr.count(refusal) == 2  # rank 1 stops with the main process's verdict, not on a timeout
    assert not base_options["cache_dir"].exists()  # before tokenizing


@pytest.mark.slow
def test_muon_on_two_cpu_processes_matches_one_process(
    base_options, argv, training_env, pretrain_subprocess, tmp_path
):
    """Under DDP every rank holds the whole, all-reduced gradient, so Muon orthogonalises the same matrices.

    The reference accumulates the two ranks' micro-batches in one thread, which sums the gradient as gloo's
    all-reduce does: Muon's bf16 Newton-Schulz (torch's) turns the last-bit differences of another summation
    order (even one process on 1 vs 2 threads) into weight differences near 1e-3, where AdamW's stay below 1e-4.
    """
    options = {**base_options, "max_steps": STEPS, "batch_size": 2, "optimizer": "muon"}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # Evaluation batches are per process: the reference scores the blocks of both ranks.
    pretrain_subprocess({**options, "grad_accum": 2, "eval_batches": 2 * options["eval_batches"], "output_dir": single})
    accelerate_launch(DDP, {**options, "output_dir": ddp}, argv, launch_env("ddp", training_env))
    compare_with_single_process(ddp, single, tolerance=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", launchers("fsdp", "deepspeed-zero2"))
def test_muon_refuses_to_start_when_weight_matrices_are_sharded(launcher, base_options, argv, training_env, tmp_path):
    launch_args, distributed_type = LAUNCHERS[launcher]
    options = {**base_options, "max_steps": STEPS, "optimizer": "muon"}
    result = subprocess.run(launch_command(launch_args, options, argv), env=launch_env(launcher, training_env),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    sharding = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}[distributed_type]
    assert (f"glade pretrain: error: --optimizer muon needs whole weight matrices, but {sharding} shards them across "
            "processes: use DDP or --optimizer adamw") in result.stderr
    assert not options["cache_dir"].exists()  # refused before tokenizing, let alone training


# `glade pretrain` that SIGKILLs its whole launch (the launcher and every rank) once the main process has logged a
# given step: a kill at a known point, which polling from outside cannot promise when steps take milliseconds.
KILL_AFTER_STEP = textwrap.dedent(
    """
    import os, signal, sys
    from glade.training import metrics
    kill_after = int(os.environ["KILL_AFTER_STEP"])
    log = metrics.MetricsLog.log
    def log_then_die(self, record):
        log(self, record)
        if record["step"] == kill_after and "train_loss" in record:
            os.kill(os.getppid(), signal.SIGKILL)  # the launcher (torchrun's agent)
            # The ranks: the agent starts them in a process group of their own (never the test's).
            os.killpg(0, signal.SIGKILL) if os.getpgid(0) != os.getpgid(os.getppid()) else os.kill(os.getpid(), 9)
    metrics.MetricsLog.log = log_then_die
    from glade.training.pretrain import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", launchers("ddp", "fsdp", "deepspeed-zero2"))
def test_a_killed_two_process_run_resumes_to_the_same_weights(launcher, base_options, argv, training_env, tmp_path):
    launch_args, _ = LAUNCHERS[launcher]
    env = launch_env(launcher, training_env)
    n = 4  # steps per checkpoint; runs go to 3n
    options = {**base_options, "max_steps": 3 * n, "batch_size": 2, "save_every": n, "keep_last": 0,
               "dropout": 0.1}  # dropout on: the resumed run must restore every rank's RNG to match
    straight = tmp_path / "straight"
    accelerate_launch(launch_args, {**options, "output_dir": straight}, argv, env)

    interrupted = tmp_path / "interrupted"
    kill_after = random.randint(n + 1, 2 * n)
    print(f"killing the launch once step {kill_after} is logged")  # shown on failure, to reproduce
    script = tmp_path / "pretrain_then_die.py"
    script.write_text(KILL_AFTER_STEP)
    killed = subprocess.run(launch_command(launch_args, {**options, "output_dir": interrupted}, argv, script),
                            env={**env, "KILL_AFTER_STEP": str(kill_after)}, capture_output=True, text=True,
                            timeout=400)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (interrupted / f"checkpoint-{n}" / "COMPLETE").exists() and not (interrupted / "final").exists()

    result = accelerate_launch(launch_args, {**options, "output_dir": interrupted, "resume": "latest"}, argv, env)
    # A step is logged before its checkpoint is saved, so a kill at step 2n's log leaves checkpoint-n the newest.
    assert f"checkpoint-{n} at step {n}" in result.stdout
    losses = [{r["step"]: r["train_loss"] for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r}
              for run in (straight, interrupted)]
    assert losses[1] == losses[0] and list(losses[0]) == list(range(1, 3 * n + 1))
    first, second = (load_file(run / "final" / "model.safetensors") for run in (straight, interrupted))
    assert first.keys() == second.keys()
    for name in first:  # one thread per process and gloo's fixed reduction order: bit for bit
        assert first[name].equal(second[name]), name


def test_the_fsdp_config_wraps_each_glade_block_and_keeps_the_tied_embedding_in_the_root(monkeypatch):
    """What `accelerate launch --config_file fsdp.yaml` hands the training processes, checked on CPU."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    from glade.tiny import tiny_model

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    for name, value in prepare_multi_gpu_env(args).items():
        if name.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert (plugin.fsdp_version, plugin.reshard_after_forward) == (2, True)
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"

    model = tiny_model()
    plugin.set_auto_wrap_policy(model)
    wrap = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [name for name, module in model.named_modules() if wrap(module)] == ["transformer.h.0", "transformer.h.1"]
    assert model.lm_head.weight is model.transformer.wte.weight  # one parameter, in the root unit


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "fsdp_cpu.yaml", "deepspeed_zero2.yaml"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.value == {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "fsdp_cpu.yaml": "FSDP",
                                             "deepspeed_zero2.yaml": "DEEPSPEED"}[name]
    assert config.mixed_precision == ("no" if name == "fsdp_cpu.yaml" else "bf16")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP on GPUs (NCCL) needs 2 CUDA devices")
def test_fsdp_on_two_gpus_matches_one_process_and_resumes_from_sharded_checkpoints(
    base_options, argv, training_env, tmp_path
):
    launch = ["--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no"]
    single = tmp_path / "single"
    accelerate_launch(["--num_processes", "1", "--mixed_precision", "no"],
                      {**base_options, "max_steps": STEPS, "batch_size": 4, "output_dir": single}, argv, training_env)
    fsdp = tmp_path / "fsdp"
    options = {**base_options, "max_steps": STEPS, "batch_size": 2, "output_dir": fsdp, "save_every": STEPS // 2,
               "keep_last": 0}
    result = accelerate_launch(launch, options, argv, training_env)
    assert "2 process(es), FSDP" in result.stdout
    assert list((fsdp / f"checkpoint-{STEPS // 2}").glob("pytorch_model_fsdp_0/*.distcp"))  # sharded state
    compare_with_single_process(fsdp, single, tolerance=1e-3)

    # Resume the second half from the sharded checkpoint in a copy of the run.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    subprocess.run(["cp", "-r", str(fsdp / f"checkpoint-{STEPS // 2}"), str(resumed)], check=True)
    accelerate_launch(launch, {**options, "output_dir": resumed, "resume": "latest"}, argv, training_env)
    first, second = (load_file(run / "final" / "model.safetensors") for run in (fsdp, resumed))
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=1e-5, msg=name)
