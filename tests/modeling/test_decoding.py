"""`CompiledDecoder`: the same greedy tokens as `generate()`, one compiled graph, and the decode kernels it uses."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from glade import hardware
from glade.decoding import CompiledDecoder, DecodeKernels

PROMPT = torch.tensor([[10, 20, 30, 40, 50, 60]])


def greedy(model, ids, new_tokens, **options):
    options.setdefault("eos_token_id", None)
    return model.generate(
        ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=256, fast_decoding="off", **options
    )


@pytest.fixture(autouse=True)
def _room_for_every_config():
    # The tests compile several configs; torch.compile's default of 8 entries per function would be reached.
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


@pytest.mark.slow
def test_greedy_tokens_equal_generate(model):
    decoder = CompiledDecoder(model, max_length=64)
    assert torch.equal(decoder.generate(PROMPT, 30), greedy(model, PROMPT, 30))


@pytest.mark.slow
def test_left_padded_batch_equals_generate(model):
    batch = torch.tensor([[256, 256, 256, 7, 8, 9], [10, 20, 30, 40, 50, 60], [256, 11, 12, 13, 14, 15]])
    mask = (batch != 256).long()
    decoder = CompiledDecoder(model, max_length=40)
    assert torch.equal(decoder.generate(batch, 20, attention_mask=mask), greedy(model, batch, 20, attention_mask=mask))


@pytest.mark.slow
def test_rows_end_at_the_end_id_and_decoding_stops_as_generate_does():
    from glade.tiny import tiny_model

    model = tiny_model(initializer_range=0.5)  # larger weights than the default: varied greedy tokens, no loops
    batch = torch.tensor([[10, 20, 30, 40, 50, 60], [5, 6, 7, 8, 9, 10]])
    first, second = greedy(model, batch, 40)[:, 6:].tolist()
    # End ids such that the first row ends early and is padded while the second goes on past the decoder's first
    # check of whether every row has ended (after 16 tokens), and stops before 40.
    early = next(token for token in first if token not in second)
    late_step = next(step for step in range(17, 39) if second[step] not in second[:step] + [early])
    end_ids = [early, second[late_step]]
    expected = greedy(model, batch, 40, eos_token_id=end_ids)
    decoded = CompiledDecoder(model, max_length=64).generate(batch, 40, eos_token_id=end_ids, pad_token_id=256)
    assert expected.shape[1] == 6 + late_step + 1 and expected[0, -1] == 256
    assert torch.equal(decoded, expected)


@pytest.mark.slow
def test_one_graph_serves_every_token_call_and_model(gpt2_model):
    from glade.tiny import tiny_model

    counters.clear()
    CompiledDecoder(gpt2_model, max_length=48).generate(PROMPT, 12)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    CompiledDecoder(gpt2_model, max_length=48).generate(PROMPT[:, :4], 20)
    CompiledDecoder(tiny_model(seed=1), max_length=48).generate(PROMPT, 12)  # same config, other weights
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_bf16_weights_decode(gpt2_model):
    model = gpt2_model.to(torch.bfloat16)
    decoded = CompiledDecoder(model, max_length=48).generate(PROMPT, 16)
    assert decoded.shape == (1, 22) and torch.equal(decoded[:, :6], PROMPT)
    # bf16 rounding may flip a near tie, so only most tokens must agree with generate()'s.
    assert (decoded == greedy(model, PROMPT, 16)).float().mean() > 0.8


@pytest.mark.slow
def test_weights_cast_after_the_first_call_decode_in_their_new_dtype(gpt2_model):
    decoder = CompiledDecoder(gpt2_model, max_length=32)
    fp32 = decoder.generate(PROMPT, 8)
    gpt2_model.to(torch.bfloat16)
    assert (decoder.generate(PROMPT, 8) == greedy(gpt2_model, PROMPT, 8)).float().mean() > 0.8
    assert decoder.cache.layers[0].keys.dtype == torch.bfloat16
    gpt2_model.to(torch.float32)
    assert torch.equal(decoder.generate(PROMPT, 8), fp32)


def test_a_decoder_of_bf16_weights_warns_where_the_cpu_emulates_bf16(gpt2_model, fake_cpu, caplog):
    hardware.warn_emulated_bf16.cache_clear()
    fake_cpu("x86_64", "avx2 fma")
    with caplog.at_level(logging.WARNING, logger="glade.hardware"):
        CompiledDecoder(gpt2_model, max_length=16)
        assert not hardware_warnings(caplog)  # fp32 weights: nothing to say
        CompiledDecoder(gpt2_model.to(torch.bfloat16), max_length=16)
    [warning] = hardware_warnings(caplog)
    assert "bf16 on a device that emulates it (this CPU has neither avx512_bf16 nor amx_bf16)" in warning


def hardware_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "glade.hardware"]


def test_too_long_requests_are_refused_with_both_lengths(gpt2_model):
    decoder = CompiledDecoder(gpt2_model, max_length=16)
    with pytest.raises(ValueError, match=r"prompt \(6 tokens\) \+ max_new_tokens \(11\) exceed .* max_length of 16"):
        decoder.generate(PROMPT, 11)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        decoder.generate(PROMPT, 0)
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 128\] \(the model's context\), got 500"):
        CompiledDecoder(gpt2_model, max_length=500)
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 128\] \(the model's context\), got 1"):
        CompiledDecoder(gpt2_model, max_length=1)
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 128\] \(the model.s context\), got 0"):
        CompiledDecoder(gpt2_model, max_length=0)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, prompt length\] with at least one token, got "
                                         r"shape \[1, 0\]"):
        decoder.generate(PROMPT[:, :0], 4)
    with pytest.raises(ValueError, match=r"attention_mask has shape \[1, 5\], input_ids \[1, 6\]: they must match"):
        decoder.generate(PROMPT, 4, attention_mask=torch.ones(1, 5, dtype=torch.long))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_single_row_linear_is_the_linear(dtype, tolerance):
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32, dtype=dtype), torch.randn(48, dtype=dtype)
    row, rows = torch.randn(1, 1, 32, dtype=dtype), torch.randn(2, 3, 32, dtype=dtype)
    with DecodeKernels():
        single, several = F.linear(row, weight, bias), F.linear(rows, weight, bias)
    assert single.dtype == dtype and single.shape == (1, 1, 48)
    torch.testing.assert_close(single, F.linear(row, weight, bias), atol=tolerance, rtol=tolerance)
    assert torch.equal(several, F.linear(rows, weight, bias))  # more rows: the library's GEMM, untouched


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_single_query_attention_is_sdpa(mask_kind):
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    mask = {"none": None, "bool": torch.rand(2, 1, 1, 9) > 0.3, "float": torch.randn(2, 1, 1, 9)}[mask_kind]
    if mask_kind == "bool":
        mask[..., 0] = True  # every query keeps a key
    with DecodeKernels():
        decoded = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(decoded, F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3))


def test_single_query_attention_with_grouped_heads():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with DecodeKernels():
        decoded = F.scaled_dot_product_attention(query, key, value, enable_gqa=True)
    torch.testing.assert_close(decoded, F.scaled_dot_product_attention(query, key, value, enable_gqa=True))


def test_a_passive_openmp_wait_policy_is_warned_about(gpt2_model, monkeypatch, caplog):
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with caplog.at_level("WARNING", logger="glade.decoding"):
        CompiledDecoder(gpt2_model)
    assert "OMP_WAIT_POLICY=PASSIVE" in caplog.text and "slower" in caplog.text
    caplog.clear()
    monkeypatch.delenv("OMP_WAIT_POLICY")
    with caplog.at_level("WARNING", logger="glade.decoding"):
        CompiledDecoder(gpt2_model)
    assert not caplog.text


@pytest.mark.slow
def test_weights_changed_after_compiling_are_used(gpt2_model):
    decoder = CompiledDecoder(gpt2_model, max_length=48)
    before = decoder.generate(PROMPT, 12)
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in gpt2_model.parameters():
            parameter.add_(torch.randn_like(parameter))
    after = decoder.generate(PROMPT, 12)
    assert not torch.equal(after, before)
    assert torch.equal(after, greedy(gpt2_model, PROMPT, 12))
