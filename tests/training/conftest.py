import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SHAKESPEARE = FIXTURES / "tinyshakespeare_150k.txt"

# 2 layers, 64 wide: small enough to train a few hundred steps on two shared cores in seconds.
TINY_MODEL = {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 128,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    return SHAKESPEARE


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE trained on the Shakespeare fixture, saved to disk."""
    from glade.training.tokenizer import save_tokenizer, train_tokenizer

    output = tmp_path_factory.mktemp("tokenizer") / "bpe-512"
    save_tokenizer(train_tokenizer([SHAKESPEARE.read_text()], 512, show_progress=False), output)
    return output


@pytest.fixture
def tiny_config_file(tmp_path) -> Path:
    path = tmp_path / "tiny_config.json"
    path.write_text(json.dumps(TINY_MODEL))
    return path


def reset_accelerate_state() -> None:
    """Accelerate keeps one process-wide state; each in-process training run needs a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    reset_accelerate_state()
    yield reset_accelerate_state
    reset_accelerate_state()


def to_argv(options: dict) -> list[str]:
    """{"max_steps": 4, "record_samples": True, "data": [a, b]} -> ["--max-steps", "4", "--record-samples", "--data", a, b]."""
    argv = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


@pytest.fixture
def base_options(tiny_config_file, bpe_tokenizer_dir, tmp_path) -> dict:
    """Options of a tiny pretraining run on the fixture; tests override what they exercise."""
    return {
        "config": tiny_config_file,
        "data": [SHAKESPEARE],
        "tokenizer": bpe_tokenizer_dir,
        "output_dir": tmp_path / "run",
        "cache_dir": tmp_path / "cache",
        "block_size": 32,
        "batch_size": 4,
        "val_fraction": 0.1,
        "eval_batches": 2,
        "log_every": 1,
        "save_every": 0,
        "eval_every": 0,
        "lr": 3e-3,
        "warmup_steps": 2,
        "mixed_precision": "no",
    }


def subprocess_env() -> dict[str, str]:
    # One thread per process: bitwise comparisons between runs need the same reduction order.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_pretrain_subprocess(options: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "glade.training.pretrain", *to_argv(options)],
        env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"pretraining failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture
def argv():
    return to_argv


@pytest.fixture
def pretrain_subprocess():
    return run_pretrain_subprocess


@pytest.fixture
def training_env() -> dict[str, str]:
    return subprocess_env()
