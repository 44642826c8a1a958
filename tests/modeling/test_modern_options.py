"""The modern options against references: transformers' Llama and Qwen3 (same math, other names), slow loops written
here, and the definitions of soft-capping and zero initialisation."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, Qwen3ForCausalLM

from glade import GladeConfig, GladeForCausalLM
from glade.conversion import glade_to_llama, stock_config_from_glade
from glade.conversion.state_dict import model_from_state_dict
from glade.tiny import tiny_model

LLAMA_LIKE = dict(positions="rotary", norm="rmsnorm", activation_function="swiglu", n_kv_head=2, bias=False,
                  tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def twins(reference_class, **options):
    """A tiny Glade model and the stock class holding the same weights, through the library's export mapping."""
    glade = tiny_model(**LLAMA_LIKE, **options)
    config = stock_config_from_glade(glade.config)
    return glade, model_from_state_dict(reference_class, config, glade_to_llama(glade.state_dict(), glade.config))


@pytest.mark.parametrize("attn_implementation",
                         ["eager", "sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)])
@pytest.mark.parametrize("reference_class,options", [
    (LlamaForCausalLM, {}),
    (Qwen3ForCausalLM, {"qk_norm": True}),
], ids=["llama", "qwen3"])
def test_rotary_rmsnorm_swiglu_gqa_and_qk_norm_compute_what_llama_and_qwen3_compute(
    reference_class, options, attn_implementation
):
    glade, reference = twins(reference_class, **options)
    for model in (glade, reference):
        model.set_attn_implementation(attn_implementation)
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        for attention_mask in (None, mask):
            expected = reference(IDS, attention_mask=attention_mask).logits
            actual = glade(IDS, attention_mask=attention_mask).logits
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_greedy_tokens_equal_llamas_with_each_cache(cache_implementation):
    glade, reference = twins(LlamaForCausalLM)
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, cache_implementation=cache_implementation)
    assert torch.equal(glade.generate(IDS, **options), reference.generate(IDS, **options))


def test_grouped_query_attention_equals_full_attention_with_each_kv_head_repeated():
    gqa = tiny_model(n_kv_head=2)
    full = tiny_model()  # 4 key/value heads: the GQA model's 2, each serving its 2 query heads
    head_dim = 16
    with torch.no_grad():
        for gqa_block, full_block in zip(gqa.transformer.h, full.transformer.h):
            q, k, v = gqa_block.attn.c_attn.weight.split(gqa_block.attn.qkv_sizes)
            q_bias, k_bias, v_bias = gqa_block.attn.c_attn.bias.split(gqa_block.attn.qkv_sizes)
            def repeat(t):
                return t.unflatten(0, (2, head_dim)).repeat_interleave(2, dim=0).flatten(0, 1)
            full_block.attn.c_attn.weight.copy_(torch.cat([q, repeat(k), repeat(v)]))
            full_block.attn.c_attn.bias.copy_(torch.cat([q_bias, repeat(k_bias), repeat(v_bias)]))
        state = {k: v for k, v in gqa.state_dict().items() if "c_attn" not in k}
        full.load_state_dict(state, strict=False)
        torch.testing.assert_close(gqa(IDS).logits, full(IDS).logits, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in full.parameters())


def test_squared_relu_mlp_equals_a_slow_loop():
    model = tiny_model(activation_function="relu2")
    mlp = model.transformer.h[0].mlp
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = torch.stack([
            mlp.c_proj.bias + sum(max(0.0, float(mlp.c_fc.weight[j] @ row + mlp.c_fc.bias[j])) ** 2
                                  * mlp.c_proj.weight[:, j] for j in range(mlp.c_fc.out_features))
            for row in x
        ])
        torch.testing.assert_close(mlp(x), expected, atol=1e-4, rtol=1e-4)


def test_swiglu_has_three_matrices_of_its_own_width():
    config = GladeConfig(n_embd=384, n_head=6, activation_function="swiglu")
    assert config.n_inner == 1024  # 8/3 * 384: as many MLP parameters as GPT-2's 4 * 384 in two matrices
    assert GladeConfig(n_embd=64, n_head=4, activation_function="swiglu").n_inner == 192  # 170.7 rounded up to 32s
    mlp = tiny_model(activation_function="swiglu", n_inner=96).transformer.h[0].mlp
    x = torch.randn(5, 64)
    with torch.no_grad():
        gate, up = x @ mlp.c_gate.weight.T + mlp.c_gate.bias, x @ mlp.c_fc.weight.T + mlp.c_fc.bias
        expected = mlp.c_proj(F.silu(gate) * up)
        torch.testing.assert_close(mlp(x), expected)
    assert mlp.c_gate.weight.shape == mlp.c_fc.weight.shape == (96, 64)


def test_soft_capped_logits_are_the_capped_logits_of_the_same_weights():
    capped = tiny_model(logit_softcap=0.5)
    plain = tiny_model()
    plain.load_state_dict(capped.state_dict())
    with torch.no_grad():
        raw = plain(IDS).logits
        torch.testing.assert_close(capped(IDS).logits, 0.5 * torch.tanh(raw / 0.5))
    assert raw.abs().max() > 0.5  # the cap was active


def test_zero_init_starts_residual_projections_and_an_untied_head_at_zero():
    model = tiny_model(zero_init=True, tie_word_embeddings=False, activation_function="swiglu")
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert block.attn.c_attn.weight.std() > 0.01 and block.mlp.c_fc.weight.std() > 0.01
    assert not model.lm_head.weight.any()
    loss = model(IDS, labels=IDS).loss
    assert loss.item() == pytest.approx(math.log(model.config.vocab_size))  # uniform first predictions
    tied = tiny_model(zero_init=True)
    assert tied.lm_head.weight.std() > 0.01  # a tied head is the embedding: never zeroed


def test_rope_theta_follows_transformers_rope_parameters(tmp_path):
    config = GladeConfig(n_embd=64, n_head=4, positions="rotary", rope_parameters={"rope_theta": 500.0})
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}
    assert GladeConfig(n_embd=64, n_head=4, positions="rotary").rope_parameters["rope_theta"] == 10000.0
    model = GladeForCausalLM(config)
    inv_freq = model.transformer.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq, 500.0 ** (-torch.arange(0, 16, 2).float() / 16))
    assert not hasattr(model.transformer, "wpe")
    model.save_pretrained(tmp_path)
    assert GladeConfig.from_pretrained(tmp_path).rope_parameters == config.rope_parameters


def test_rotary_attention_depends_on_relative_positions_only():
    model = tiny_model(positions="rotary")
    ids = IDS[:1, :6]
    with torch.no_grad():
        at_zero = model(ids, position_ids=torch.arange(6)[None]).logits
        shifted = model(ids, position_ids=torch.arange(6)[None] + 17).logits
    torch.testing.assert_close(at_zero, shifted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fields,message", [
    ({"n_kv_head": 3}, "n_kv_head (3) must divide n_head (4)"),
    ({"num_key_value_heads": 0}, "n_kv_head must be positive"),
    ({"positions": "alibi"}, "positions must be one of"),
    ({"norm": "batchnorm"}, "norm must be one of"),
    ({"activation_function": "relu"}, "activation_function must be one of"),
    ({"positions": "rotary", "n_embd": 60, "n_head": 20}, "needs an even, non-zero number of rotating channels"),
    ({"positions": "rotary", "rope_parameters": {"partial_rotary_factor": 0.1}}, "rotating channels per head, got 1"),
    ({"positions": "rotary", "rope_parameters": {"partial_rotary_factor": 1.5}}, "must be in (0, 1], got 1.5"),
    ({"rope_parameters": {"rope_theta": 500.0}}, "rope_parameters applies to positions='rotary', not 'learned'"),
    ({"rope_theta": 500.0}, "rope_parameters applies to positions='rotary'"),
    ({"norm_gain": 0}, "norm_gain must be a bool"),
    ({"embedding_norm": "no"}, "embedding_norm must be a bool"),
    ({"logit_softcap": 0}, "logit_softcap must be a positive number or None"),
    ({"qk_norm": "yes"}, "qk_norm must be a bool"),
    ({"zero_init": 1}, "zero_init must be a bool"),
])
def test_incompatible_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GladeConfig(**{"n_embd": 64, "n_head": 4, **fields})


def test_canonical_names_are_set_before_the_defaults_that_depend_on_them():
    config = GladeConfig(hidden_size=64, num_attention_heads=4, activation_function="swiglu")
    assert (config.n_embd, config.n_head, config.n_kv_head, config.n_inner) == (64, 4, 4, 192)
    assert GladeConfig(n_embd=64, n_head=4, num_key_value_heads=2).n_kv_head == 2


def test_a_default_config_is_gpt2_with_every_option_off():
    config = GladeConfig()
    options = (config.positions, config.norm, config.qk_norm, config.n_kv_head, config.logit_softcap, config.zero_init)
    assert options == ("learned", "layernorm", False, config.n_head, None, False)
    model = tiny_model()
    assert isinstance(model.transformer.ln_f, torch.nn.LayerNorm) and hasattr(model.transformer, "wpe")
    assert not hasattr(model.transformer.h[0].attn, "q_norm")


def test_the_modern_preset_is_glade_small_with_the_options_the_ablation_kept():
    modern, small = GladeConfig.from_preset("glade-small-modern"), GladeConfig.from_preset("glade-small")
    differences = {key for key, value in modern.to_dict().items() if small.to_dict().get(key) != value}
    assert differences == {"positions", "rope_parameters"}  # docs/recipe.md: rotary helped, on top of Muon
    assert modern.positions == "rotary" and modern.n_embd == small.n_embd and modern.n_layer == small.n_layer
