"""Every fast path computes what the reference path computes: same loss and gradients within dtype tolerance."""

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import glade.kernels_glade as kernels
from glade.tiny import tiny_model

IDS = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))


def masked_labels() -> torch.Tensor:
    labels = IDS.clone()
    labels[0, 9:] = -100  # a padded row
    labels[2, :4] = -100  # an ignored prompt
    return labels


def loss_and_grads(model, skip_logits: bool, autocast: bool = False, **inputs):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(IDS, skip_logits=skip_logits, **inputs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "inputs",
    [
        {"labels": IDS},
        {"labels": masked_labels()},
        {"labels": masked_labels(), "num_items_in_batch": torch.tensor(17)},
        {"labels": IDS, "shift_labels": masked_labels()},
    ],
    ids=["plain", "ignore_index", "num_items_in_batch", "shift_labels"],
)
def test_fused_loss_equals_transformers_loss_in_fp32(monkeypatch, inputs):
    # 72 positions in chunks of 16: four full chunks and a partial one.
    monkeypatch.setattr(kernels, "LOSS_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(kernels, "LOSS_CHUNK_MIN_ROWS", 16)
    model = tiny_model().train()
    reference, reference_grads = loss_and_grads(model, skip_logits=False, **inputs)
    fused, fused_grads = loss_and_grads(model, skip_logits=True, **inputs)
    assert fused.logits is None and reference.logits is not None
    torch.testing.assert_close(fused.loss, reference.loss, atol=1e-6, rtol=1e-6)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_fused_loss_under_bf16_autocast_stays_within_bf16_tolerance(monkeypatch):
    monkeypatch.setattr(kernels, "LOSS_CHUNK_MIN_ROWS", 16)
    monkeypatch.setattr(kernels, "LOSS_CHUNK_ELEMENTS", 1)
    model = tiny_model().train()
    labels = masked_labels()
    reference, reference_grads = loss_and_grads(model, skip_logits=False, autocast=True, labels=labels)
    fused, fused_grads = loss_and_grads(model, skip_logits=True, autocast=True, labels=labels)
    torch.testing.assert_close(fused.loss, reference.loss, atol=0, rtol=1e-3)
    for name, grad in reference_grads.items():
        # bf16 keeps 8 bits of mantissa: one rounding is 2^-8 ~ 0.4% of the largest entry.
        assert (fused_grads[name] - grad).abs().max() <= 2e-2 * grad.abs().max(), name


@pytest.mark.slow
def test_loss_without_gradients_matches_and_computes_none():
    model = tiny_model().train()

    def loss_and_matmuls(**options):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            loss = model(IDS, labels=masked_labels(), **options).loss
        return loss, sum(event.name == "aten::mm" for event in profiler.events())

    _, matmuls_with_gradients = loss_and_matmuls()  # the fused loss computes its gradients during forward
    with torch.no_grad():
        fused, fused_matmuls = loss_and_matmuls()
        reference, _ = loss_and_matmuls(skip_logits=False)
    torch.testing.assert_close(fused, reference, atol=1e-6, rtol=1e-6)
    assert fused_matmuls < matmuls_with_gradients


def test_logits_are_skipped_only_when_training_with_labels():
    model = tiny_model()
    assert model(IDS, labels=IDS).logits is not None  # eval mode: evaluation metrics need logits
    model.train()
    assert model(IDS).logits.shape == (3, 24, 257)
    assert model(IDS, labels=IDS).logits is None
    assert model(IDS, labels=IDS, skip_logits=False).logits.shape == (3, 24, 257)
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        model(IDS, skip_logits=True)


def test_custom_loss_function_and_hooked_head_take_the_reference_path():
    model = tiny_model().train()
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum() * 0 + 42.0
    out = model(IDS, labels=IDS)
    assert out.loss.item() == 42.0 and out.logits is not None

    model = tiny_model().train()
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    out = model(IDS, labels=IDS)
    assert seen == [(3, 24, 257)] and out.logits is not None


@pytest.mark.slow
def test_sdpa_gets_no_mask_unless_there_is_padding(sdpa_masks):
    """Pure causal attention runs sdpa's is_causal kernel: no [T, T] mask is built, in training or decoding."""
    masks = sdpa_masks
    model = tiny_model()
    assert model.config._attn_implementation == "sdpa"
    model.train()
    model(IDS, labels=IDS)
    model.eval()
    # transformers' generate() and its dynamic cache (the fast route's static cache needs a mask over its unfilled
    # slots at every step).
    model.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=3, do_sample=False,
                   fast_decoding="off")
    assert len(masks) == 2 * 4 and all(mask is None for mask in masks)

    masks.clear()
    padded = torch.ones_like(IDS)
    padded[0, :5] = 0
    model(IDS, attention_mask=padded)
    assert all(isinstance(mask, torch.Tensor) for mask in masks)


def attention_and_grads(attention, dtype: torch.dtype):
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 3, 21, 8).to(dtype).requires_grad_() for _ in range(3))
    output = attention(query, key, value)
    output.backward(torch.randn(output.shape).to(dtype))
    return [output.float()] + [tensor.grad.float() for tensor in (query, key, value)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_causal_attention_matches_sdpa(monkeypatch, dtype):
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK", 8)  # 21 positions: two full blocks and a partial one
    exact = attention_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), torch.float64)
    sdpa = attention_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), dtype)
    block = attention_and_grads(lambda q, k, v: kernels.BlockCausalAttention.apply(q, k, v, 8**-0.5), dtype)
    for name, reference, sdpa_result, block_result in zip(["output", "query", "key", "value"], exact, sdpa, block):
        sdpa_error = (sdpa_result - reference).abs().max()
        block_error = (block_result - reference).abs().max()
        if dtype == torch.float32:
            assert block_error < 1e-5, name
        else:  # no further from the exact result than torch's own kernel, up to one bf16 rounding
            assert block_error <= 2 * sdpa_error + 2**-8 * reference.abs().max(), name


@pytest.mark.slow
def test_block_attention_is_a_named_implementation_that_compiles_without_graph_breaks_and_matches_sdpa(monkeypatch):
    """`attn_implementation="glade_block"` runs the block kernel for whole causal sequences (sdpa is not even traced)
    and sdpa where a padding mask is involved; loss and gradients stay those of plain sdpa."""
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK", 8)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    sdpa_calls = []

    def recording_sdpa(*args, **kwargs):
        sdpa_calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", recording_sdpa)
    monkeypatch.setattr(kernels, "sdpa_attention_forward", recording_sdpa)
    model = tiny_model().train()
    labels = masked_labels()
    eager, eager_grads = loss_and_grads(model, skip_logits=True, labels=labels)
    assert len(sdpa_calls) == 2

    model.set_attn_implementation("glade_block")
    assert model.config._attn_implementation == "glade_block"
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    model.zero_grad(set_to_none=True)
    loss = compiled(IDS, labels=labels).loss
    loss.backward()
    assert len(sdpa_calls) == 2  # not even traced
    torch.testing.assert_close(loss, eager.loss, atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    padding = torch.ones_like(IDS)
    padding[0, :5] = 0
    with torch.no_grad():
        padded = model(IDS, attention_mask=padding).logits
    assert len(sdpa_calls) == 4  # a padding mask goes to sdpa, in both layers
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(padded, model(IDS, attention_mask=padding).logits)


@pytest.mark.parametrize("inputs", [{"labels": IDS}, {"labels": masked_labels()}], ids=["plain", "ignore_index"])
def test_fused_loss_with_soft_capped_logits_equals_capping_the_logits(monkeypatch, inputs):
    monkeypatch.setattr(kernels, "LOSS_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(kernels, "LOSS_CHUNK_MIN_ROWS", 16)
    model = tiny_model().train()
    model.config.logit_softcap = 0.25  # small enough that the cap changes the loss a lot
    reference, reference_grads = loss_and_grads(model, skip_logits=False, **inputs)
    fused, fused_grads = loss_and_grads(model, skip_logits=True, **inputs)
    logits = model.lm_head(model.transformer(IDS).last_hidden_state)
    assert reference.logits.abs().max() < 0.25 < logits.abs().max()  # the reference path capped its logits
    torch.testing.assert_close(fused.loss, reference.loss, atol=1e-6, rtol=1e-6)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_gelu_under_compile_is_gpt2s_gelu_with_the_same_gradient():
    from glade.modeling_glade import gelu_tanh

    x = torch.linspace(-8, 8, 4001, dtype=torch.float64).float().requires_grad_()
    compiled = torch.compile(gelu_tanh, fullgraph=True)(x)
    (grad_compiled,) = torch.autograd.grad(compiled.sum(), x)
    eager = gelu_tanh(x)  # torch's fused kernel, which GPT-2's conversion parity is measured with
    (grad_eager,) = torch.autograd.grad(eager.sum(), x)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_compiled, grad_eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(eager, torch.nn.functional.gelu(x, approximate="tanh"))
