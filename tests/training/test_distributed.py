import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


def accelerate_launch(launch_args: list[str], options: dict, argv, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--main_process_port",
               str(free_port()), "-m", "glade.training.pretrain", *argv(options)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
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


def test_ddp_over_two_cpu_processes_shards_the_data_and_matches_one_process(
    base_options, argv, training_env, single_process_run, tmp_path
):
    # `accelerate launch --cpu` starts a single process unless mpirun is configured; a torchrun-style launch with
    # ACCELERATE_USE_CPU gives two CPU processes talking over gloo.
    output = tmp_path / "ddp"
    options = {**base_options, "max_steps": STEPS, "batch_size": 2, "record_samples": True, "output_dir": output,
               "save_every": STEPS}
    result = accelerate_launch(
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no"],
        options, argv, {**training_env, "ACCELERATE_USE_CPU": "true"},
    )
    assert "2 process(es), MULTI_CPU" in result.stdout

    ranks = [blocks_per_step(output / "samples" / f"rank-{rank}.jsonl") for rank in (0, 1)]
    single = blocks_per_step(single_process_run / "samples" / "rank-0.jsonl")
    assert list(ranks[0]) == list(ranks[1]) == list(range(STEPS))  # every rank ran every step
    for step in range(STEPS):
        assert len(ranks[0][step]) == len(ranks[1][step]) == 2
        assert not set(ranks[0][step]) & set(ranks[1][step])  # disjoint shards
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(single[step])  # together: the same global batch
    assert {p.name for p in (output / f"checkpoint-{STEPS}").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}  # every rank's RNG is checkpointed
    compare_with_single_process(output, single_process_run, tolerance=1e-4)


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


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.value == {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP",
                                             "deepspeed_zero2.yaml": "DEEPSPEED"}[name]
    assert config.mixed_precision == "bf16"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="accelerate runs FSDP on GPUs only; needs 2 CUDA devices")
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
