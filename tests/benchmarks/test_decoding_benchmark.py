"""`benchmarks/decoding.py`: per-token time as the difference of a long and a short call, and its floor."""

from pathlib import Path

import pytest
import torch


@pytest.fixture
def decoding(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import decoding

    return decoding


def test_per_token_time_cancels_what_every_call_costs(decoding, monkeypatch):
    clock = [0.0]
    calls = []

    def run(tokens: int) -> None:
        calls.append(tokens)
        clock[0] += 0.250 + 0.002 * tokens  # a fixed 250 ms per call (prompt, setup), 2 ms per token

    monkeypatch.setattr(decoding.time, "perf_counter", lambda: clock[0])
    assert decoding.per_token_ms(run, long=200, short=24, repeats=3) == pytest.approx(2.0)
    assert calls == [200, 24] + [200, 24] * 3  # one warm-up call of each length first


def test_the_floor_counts_tied_weights_once(decoding):
    from glade.tiny import tiny_model

    model = tiny_model()
    _, megabytes = decoding.floor_ms(model, repeats=1)
    stored = model.state_dict()  # lists the tied head and the embedding both
    assert stored["lm_head.weight"].data_ptr() == stored["transformer.wte.weight"].data_ptr()
    once = sum(tensor.numel() for key, tensor in stored.items() if key != "lm_head.weight" and tensor.is_floating_point())
    assert megabytes * 1e6 == pytest.approx(4 * once)


def test_the_gpt2_twin_has_the_checkpoints_shape(decoding):
    from glade.tiny import tiny_config

    twin = decoding.gpt2_twin(tiny_config(n_inner=96))
    shape = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
    assert [getattr(twin.config, name) for name in shape] == [257, 128, 64, 2, 4, 96]
    assert isinstance(twin, torch.nn.Module) and not twin.training
