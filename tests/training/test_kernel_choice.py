"""Choosing how a compiled CPU training step runs, by timing one block: the fastest candidate wins (uncompiled included
when asked), every candidate is real, and the block timed is the config's own."""

import copy

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from glade.training import kernel_choice
from glade.training.kernel_choice import CANDIDATES, UNCOMPILED, choose_kernel
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


def test_each_block_timed_runs_its_own_kernel_and_computes_causal_attention(monkeypatch):
    """Transformers falls back to eager attention for a name it does not know, so a candidate that is not a registered
    kernel would be timed as something else: each block must call its own kernel, uncompiled sdpa, and give what plain
    softmax attention with an explicit causal mask gives (rotary and grouped keys included)."""
    calls = []
    for name in CANDIDATES:
        def recording(*args, _name=name, _kernel=ALL_ATTENTION_FUNCTIONS[name], **kwargs):
            calls.append(_name)
            return _kernel(*args, **kwargs)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, name, recording)
    seq_len = 12
    causal = torch.full((seq_len, seq_len), float("-inf")).triu(1)
    checked = []

    def run_once(block, hidden, position_embeddings, compiled, dtype, repeats, backward):
        name = block.attn.config._attn_implementation if compiled else UNCOMPILED
        calls.clear()
        output = block(hidden, position_embeddings=position_embeddings)
        assert calls == [name if compiled else "sdpa"], name
        reference = copy.deepcopy(block)
        reference.attn.config._attn_implementation = "eager"
        expected = reference(hidden, attention_mask=causal, position_embeddings=position_embeddings)
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5, msg=name)
        checked.append(name)
        return 1.0

    monkeypatch.setattr(kernel_choice, "time_block", run_once)
    choose_kernel(tiny_config(n_kv_head=2, positions="rotary"), batch_size=2, seq_len=seq_len, dtype=torch.float32,
                  uncompiled=True)
    assert checked == [UNCOMPILED, *CANDIDATES]


@pytest.mark.slow
def test_every_candidate_is_timed_for_training_and_for_inference():
    for backward in (True, False):
        choice = choose_kernel(tiny_config(), batch_size=2, seq_len=32, dtype=torch.float32, repeats=2,
                               backward=backward, uncompiled=backward)
        expected = ((UNCOMPILED,) if backward else ()) + CANDIDATES
        assert tuple(choice.milliseconds) == expected and all(ms > 0 for ms in choice.milliseconds.values())
        assert choice.milliseconds[choice.implementation] == min(choice.milliseconds.values())
        assert choice.describe().endswith("per block, forward + backward)" if backward else "per block, forward)")
