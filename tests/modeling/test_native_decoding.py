"""The C decoding step (`glade.native_decoding`): the model's logits and generate()'s tokens for every architecture it
takes, int8 weights as their fake-quantized fp32 twins compute, and a clear refusal or fallback everywhere else."""

import logging

import pytest
import torch
from transformers import StaticCache

from glade import fast_generate, native_decoding
from glade.decoding import CompiledDecoder
from glade.native_decoding import NativeStep, int8_twin, library, quantize_int8, unavailable
from glade.tiny import tiny_model

pytestmark = pytest.mark.skipif(library() is None, reason="no C compiler to build the native step")

PROMPTS = torch.tensor([[256, 256, 256, 7, 8, 9], [10, 20, 30, 40, 50, 60], [256, 11, 12, 13, 14, 15]])
MASK = (PROMPTS != 256).long()
NATIVE_ARCHITECTURES = {
    "gpt2": {},
    "rotary, rmsnorm, swiglu, gqa, no bias, untied, soft cap": dict(
        positions="rotary", norm="rmsnorm", activation_function="swiglu", n_kv_head=2, bias=False,
        tie_word_embeddings=False, logit_softcap=30.0,
    ),
    "no gains, embedding norm, relu2, partial rotary": dict(
        positions="rotary", norm="rmsnorm", norm_gain=False, embedding_norm=True, activation_function="relu2",
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
    ),
    "exact gelu, widths off the vector length": dict(activation_function="gelu", n_embd=40, n_head=5, n_inner=100),
}


@pytest.fixture(params=list(NATIVE_ARCHITECTURES))
def native_model(request):
    return tiny_model(seed=1, **NATIVE_ARCHITECTURES[request.param])


def stepwise_logits(model, native: str | None, steps: int = 5) -> torch.Tensor:
    """[steps, batch, vocab]: the logits after each of `steps` fixed tokens following the left-padded prompts, from
    the C step (`native`; the prompt too goes through it one position at a time, as the int8 route runs it) or from
    the model's own cached forward (None)."""
    length = 16
    cache = StaticCache(config=model.config, max_cache_len=length)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[:, : PROMPTS.shape[1]] = MASK
    positions = MASK.sum(-1, keepdim=True)
    if native:
        step = NativeStep(library(), model, 3, length, int8=native == "int8")
        step.prompt(cache, PROMPTS, mask)
    else:
        with torch.no_grad():
            model(input_ids=PROMPTS, attention_mask=MASK, cache=cache, use_cache=True)
    out = []
    for index in range(steps):
        tokens = torch.tensor([[3 + index], [100 + index], [200 - index]])
        with torch.no_grad():
            if native:
                logits = step.logits_after(tokens, positions, mask).clone()
            else:
                logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]
        out.append(logits)
        positions = positions + 1
    return torch.stack(out)


def test_logits_are_the_models_for_every_step_and_row(native_model):
    assert unavailable(native_model) is None
    torch.testing.assert_close(
        stepwise_logits(native_model, "fp32"), stepwise_logits(native_model, None), atol=2e-5, rtol=1e-4
    )


def test_int8_logits_are_those_of_the_fake_quantized_model(native_model):
    expected = stepwise_logits(int8_twin(native_model), None)
    torch.testing.assert_close(stepwise_logits(native_model, "int8"), expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(stepwise_logits(native_model, "fp32"), expected, atol=1e-4)  # int8 is not fp32


def test_quantization_keeps_each_rows_largest_weight_and_rounds_to_half_a_step():
    weight = torch.randn(6, 10)
    quantized, scale = quantize_int8(weight)
    assert quantized.dtype == torch.int8 and (quantized.abs().amax(1) == 127).all()
    assert ((quantized.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_generate_routes_give_generates_greedy_tokens(native_model):
    options = dict(attention_mask=MASK, max_new_tokens=20, do_sample=False, pad_token_id=256)
    expected = native_model.generate(PROMPTS, fast_decoding="off", **options)
    assert torch.equal(native_model.generate(PROMPTS, **options), expected)  # auto takes the C step
    assert list(fast_generate.decoder_pool(native_model).decoders) == [(3, "native")]
    int8 = native_model.generate(PROMPTS, fast_decoding="int8", **options)
    assert torch.equal(int8, int8_twin(native_model).generate(PROMPTS, fast_decoding="off", **options))


def test_sampling_with_a_seed_gives_generates_tokens(gpt2_model):
    options = dict(attention_mask=MASK, max_new_tokens=24, pad_token_id=256, do_sample=True, temperature=0.8,
                   top_k=20, top_p=0.9, repetition_penalty=1.2, min_new_tokens=8)
    runs = {
        route: gpt2_model.generate(PROMPTS, fast_decoding=route, generator=torch.Generator().manual_seed(5), **options)
        for route in ("off", "native")
    }
    assert torch.equal(runs["native"], runs["off"])


def test_weights_changed_after_a_call_are_used_by_the_next(gpt2_model):
    for route in ("native", "int8"):
        decoder = CompiledDecoder(gpt2_model, max_length=32, native="fp32" if route == "native" else "int8")
        before = decoder.generate(PROMPTS[1:], 8)
        with torch.no_grad():
            gpt2_model.transformer.h[0].mlp.c_fc.weight.mul_(-3.0)  # in place
            gain = torch.full_like(gpt2_model.transformer.ln_f.weight, 2.0)
            gpt2_model.transformer.ln_f.weight = torch.nn.Parameter(gain)  # a new tensor
        expected = gpt2_model.generate(PROMPTS[1:], max_new_tokens=8, do_sample=False, fast_decoding="off")
        got = decoder.generate(PROMPTS[1:], 8)
        assert not torch.equal(got, before)
        if route == "native":
            assert torch.equal(got, expected)


UNSUPPORTED = {
    "QK-norm": dict(positions="rotary", qk_norm=True),
    "residual lambdas": dict(residual_lambdas=True),
    "value embeddings": dict(value_embeddings=True),
}


@pytest.mark.parametrize("options", UNSUPPORTED.values(), ids=UNSUPPORTED)
def test_a_model_it_does_not_cover_is_refused_by_name_or_takes_the_compiled_steps_route(options):
    model = tiny_model(**options)
    with pytest.raises(ValueError, match="native decoding step cannot run this model: .*"):
        model.generate(PROMPTS[1:2], max_new_tokens=4, fast_decoding="native")
    model.generate(PROMPTS[1:2], max_new_tokens=4, do_sample=False)
    assert list(fast_generate.decoder_pool(model).decoders) == [(1, "eager")]


def test_a_bf16_model_is_refused_with_its_dtype(gpt2_model):
    assert "torch.bfloat16 on cpu" in unavailable(gpt2_model.to(torch.bfloat16))
    with pytest.raises(ValueError, match="bfloat16"):
        CompiledDecoder(gpt2_model, native="int8")


def test_the_library_is_built_once_into_the_cache_and_a_missing_compiler_falls_back(
    gpt2_model, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("GLADE_CACHE", str(tmp_path))
    built = native_decoding.build()
    assert built.parent == tmp_path / "native" and built.is_file()
    monkeypatch.setattr(native_decoding.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    assert native_decoding.build() == built
    assert [path.name for path in (tmp_path / "native").iterdir()] == [built.name]  # no scratch left behind

    monkeypatch.undo()
    monkeypatch.setenv("GLADE_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native_decoding, "_library", None)
    monkeypatch.setattr(native_decoding, "_library_error", None)
    with caplog.at_level(logging.WARNING, logger="glade.native_decoding"):
        assert library() is None
    assert "could not be built" in caplog.text
    assert "could not be built here" in unavailable(gpt2_model)
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=256)
    assert torch.equal(
        gpt2_model.generate(PROMPTS[1:2], **options), gpt2_model.generate(PROMPTS[1:2], fast_decoding="off", **options)
    )
    assert list(fast_generate.decoder_pool(gpt2_model).decoders) == [(1, "eager")]


def test_the_int8_route_checks_prompt_ids_before_c_reads_them(gpt2_model):
    with pytest.raises(ValueError, match="token id 300, outside the vocabulary"):
        gpt2_model.generate(torch.tensor([[5, 300]]), max_new_tokens=3, fast_decoding="int8")


def test_a_model_with_a_lora_adapter_takes_the_other_routes(gpt2_model):
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(gpt2_model, LoraConfig(r=2)).base_model.model
    assert unavailable(adapted) == "a projection is wrapped or replaced (adapters, quantization)"
