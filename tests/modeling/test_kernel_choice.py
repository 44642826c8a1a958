"""Choosing how a compiled CPU training step runs, by timing one block: the fastest candidate wins (uncompiled included
when asked), every candidate is real, and the block timed is the config's own."""

import pytest
import torch

from glade import kernel_choice
from glade.kernel_choice import CANDIDATES, UNCOMPILED, choose_kernel
from glade.kernels_glade import BLOCK_ATTENTION
from glade.tiny import tiny_config


@pytest.mark.parametrize("timings, uncompiled, winner", [
    ({"sdpa": 2.0, BLOCK_ATTENTION: 1.0}, False, BLOCK_ATTENTION),
    ({"sdpa": 1.0, BLOCK_ATTENTION: 3.0}, False, "sdpa"),
    ({UNCOMPILED: 0.5, "sdpa": 1.0, BLOCK_ATTENTION: 3.0}, True, UNCOMPILED),
    ({UNCOMPILED: 5.0, "sdpa": 1.0, BLOCK_ATTENTION: 3.0}, True, "sdpa"),
])
def test_the_fastest_candidate_is_chosen(monkeypatch, timings, uncompiled, winner):
    seen = []

    def fake_timing(block, hidden, position_embeddings, compiled, dtype, repeats, backward):
        name = block.attn.config._attn_implementation if compiled else UNCOMPILED
        seen.append((name, hidden.shape, dtype, position_embeddings is None, block.training))
        return timings[name] / 1e3

    monkeypatch.setattr(kernel_choice, "time_block", fake_timing)
    choice = choose_kernel(tiny_config(n_kv_head=2), batch_size=3, seq_len=20, dtype=torch.bfloat16,
                           uncompiled=uncompiled)
    assert choice.implementation == winner and choice.compiled == (winner != UNCOMPILED)
    assert choice.milliseconds == pytest.approx(timings)
    assert choice.describe().startswith(f"{winner} (")
    # One block at the run's batch shape and autocast dtype, in training mode, with learned positions (no rotary).
    names = ((UNCOMPILED,) if uncompiled else ()) + CANDIDATES
    assert seen == [(name, (3, 20, 64), torch.bfloat16, True, True) for name in names]


def test_rotary_blocks_are_timed_with_their_rotations(monkeypatch):
    seen = []
    monkeypatch.setattr(kernel_choice, "time_block",
                        lambda block, hidden, position_embeddings, *args: seen.append(position_embeddings) or 1.0)
    choose_kernel(tiny_config(positions="rotary"), batch_size=2, seq_len=8, dtype=torch.float32)
    cos, sin = seen[0]
    assert cos.shape == sin.shape == (2, 8, 16)


def test_every_candidate_is_timed_for_training_and_for_inference():
    for backward in (True, False):
        choice = choose_kernel(tiny_config(), batch_size=2, seq_len=32, dtype=torch.float32, repeats=2,
                               backward=backward, uncompiled=backward)
        expected = ((UNCOMPILED,) if backward else ()) + CANDIDATES
        assert tuple(choice.milliseconds) == expected and all(ms > 0 for ms in choice.milliseconds.values())
        assert choice.milliseconds[choice.implementation] == min(choice.milliseconds.values())
        assert choice.describe().endswith("per block, forward + backward)" if backward else "per block, forward)")
