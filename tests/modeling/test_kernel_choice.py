"""Choosing the compiled CPU attention kernel by timing: the fastest candidate wins, and every candidate is real."""

import pytest
import torch

from glade import kernel_choice
from glade.kernel_choice import CANDIDATES, fastest_compiled_attention
from glade.kernels_glade import BLOCK_ATTENTION
from glade.tiny import tiny_config


def test_the_candidates_are_sdpa_and_block_attention():
    assert CANDIDATES == ("sdpa", BLOCK_ATTENTION)


@pytest.mark.parametrize("timings, winner", [({"sdpa": 2.0, BLOCK_ATTENTION: 1.0}, BLOCK_ATTENTION),
                                             ({"sdpa": 1.0, BLOCK_ATTENTION: 3.0}, "sdpa")])
def test_the_faster_kernel_is_chosen(monkeypatch, timings, winner):
    shapes = []

    def fake_timing(name, query, key, value, repeats, backward):
        shapes.append((name, query.shape, key.shape, query.dtype))
        return timings[name] / 1e3

    monkeypatch.setattr(kernel_choice, "time_compiled_attention", fake_timing)
    choice = fastest_compiled_attention(tiny_config(n_kv_head=2), batch_size=3, seq_len=20, dtype=torch.bfloat16)
    assert choice.implementation == winner
    assert choice.milliseconds == pytest.approx(timings)
    assert choice.describe().startswith(f"{winner} (sdpa {timings['sdpa']:.1f} ms, {BLOCK_ATTENTION} ")
    # One layer's queries, keys and values at the run's shape: grouped keys keep their own head count.
    assert shapes == [(name, (3, 4, 20, 16), (3, 2, 20, 16), torch.bfloat16) for name in CANDIDATES]


def test_both_kernels_are_timed_compiled_for_training_and_for_inference():
    for backward in (True, False):
        choice = fastest_compiled_attention(tiny_config(), batch_size=2, seq_len=32, dtype=torch.float32, repeats=2,
                                            backward=backward)
        assert set(choice.milliseconds) == set(CANDIDATES) and all(ms > 0 for ms in choice.milliseconds.values())
        assert choice.milliseconds[choice.implementation] == min(choice.milliseconds.values())
        assert choice.describe().endswith("forward + backward)" if backward else "attention, forward)")
