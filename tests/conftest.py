import os

import pytest
import torch

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path_factory):
    """Nothing in the suite may reach the network, and remote-code modules land in a throwaway HF_HOME."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


@pytest.fixture
def tokenizer():
    from glade.tiny import byte_level_tokenizer

    return byte_level_tokenizer()


@pytest.fixture
def model():
    from glade.tiny import tiny_model

    return tiny_model()


@pytest.fixture
def fake_cpu(monkeypatch):
    """fake_cpu(machine, flags): what glade.hardware reads of the CPU (its architecture and feature flags)."""
    from glade import hardware

    def fake(machine: str, flags: str) -> None:
        monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
        monkeypatch.setattr(hardware, "cpu_features", lambda: frozenset(flags.split()))

    return fake
