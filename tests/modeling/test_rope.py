"""RoPE the transformers way: every `rope_type` of transformers' `ROPE_INIT_FUNCTIONS` computes the angles Llama's
rotary embedding computes from the same parameters, partial rotation is GPT-NeoX's, and a rotary model reads past
n_positions (its trained length) where a learned-position model stops."""

import logging

import pytest
import torch
from transformers import GPTNeoXForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from glade import GladeConfig
from glade.conversion import glade_to_gpt_neox, stock_config_from_glade
from glade.conversion.state_dict import model_from_state_dict
from glade.modeling_glade import GladeRotaryEmbedding
from glade.tiny import tiny_model

N_POSITIONS = 32
HALF_HEAD = 8  # n_embd=64 over 4 heads: 16 channels, 8 rotating pairs
ROPE_TYPES = {
    "default": {},
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": N_POSITIONS},
    "longrope": {
        "short_factor": [1.0 + i / 10 for i in range(HALF_HEAD)],
        "long_factor": [2.0 + i / 4 for i in range(HALF_HEAD)],
        "original_max_position_embeddings": N_POSITIONS // 2,
    },
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": N_POSITIONS // 4},
}


def rope_parameters(rope_type: str) -> dict:
    return {"rope_type": rope_type, "rope_theta": 500.0, **ROPE_TYPES[rope_type]}


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_each_rope_type_rotates_as_llama_does(rope_type):
    config = GladeConfig(n_embd=64, n_head=4, n_positions=N_POSITIONS, positions="rotary",
                         rope_parameters=rope_parameters(rope_type))
    reference_config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=N_POSITIONS,
                                   rope_parameters=rope_parameters(rope_type))
    glade, llama = GladeRotaryEmbedding(config), LlamaRotaryEmbedding(reference_config)
    x = torch.zeros(1)
    # Short, then past the trained length (dynamic and longrope switch there), then short again (dynamic resets).
    for length in (N_POSITIONS // 2, 3 * N_POSITIONS, N_POSITIONS // 2):
        positions = torch.arange(length)[None]
        for actual, expected in zip(glade(x, positions), llama(x, positions)):
            torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    if rope_type != "default":  # each scaling changes some angle that the default rotation has
        unscaled = GladeRotaryEmbedding(GladeConfig(n_embd=64, n_head=4, n_positions=N_POSITIONS,
                                                    positions="rotary", rope_parameters=rope_parameters("default")))
        positions = torch.arange(3 * N_POSITIONS)[None]
        assert not torch.equal(glade(x, positions)[0], unscaled(x, positions)[0])


@torch.no_grad()
def test_partial_rotation_computes_what_gpt_neox_computes():
    glade = tiny_model(positions="rotary", rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    assert glade.config.rotary_dim == 4 and glade.transformer.rotary_emb.inv_freq.numel() == 2
    config = stock_config_from_glade(glade.config)
    assert config.rope_parameters["partial_rotary_factor"] == 0.25 and config.rotary_pct == 0.25
    neox = model_from_state_dict(GPTNeoXForCausalLM, config, glade_to_gpt_neox(glade.state_dict(), glade.config))
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(glade(ids).logits, neox(ids).logits, atol=1e-5, rtol=1e-5)
    full = tiny_model(positions="rotary")
    assert not torch.allclose(glade(ids).logits, full(ids).logits, atol=1e-3)  # the same weights, rotated otherwise


@torch.no_grad()
def test_only_the_rotating_channels_depend_on_position():
    glade = tiny_model(positions="rotary", rope_parameters={"partial_rotary_factor": 0.5})
    rotary = glade.transformer.rotary_emb
    query = torch.randn(1, 4, 6, 16)
    cos, sin = rotary(query, torch.arange(6)[None] + 40)
    from glade.modeling_glade import apply_partial_rotary_pos_emb

    rotated, _ = apply_partial_rotary_pos_emb(query, query, cos, sin)
    assert torch.equal(rotated[..., 8:], query[..., 8:])
    assert not torch.allclose(rotated[..., :8], query[..., :8])


def test_a_rotary_model_reads_past_n_positions_and_warns_only_without_scaling(caplog):
    ids = torch.randint(0, 256, (1, 160))  # tiny models train 128 positions
    unscaled = tiny_model(positions="rotary")
    with caplog.at_level(logging.WARNING, logger="glade.modeling_glade"):
        assert unscaled(ids).logits.shape == (1, 160, 257)
    assert "Sequence length 160 is past the 128 positions this model was trained on" in caplog.text
    caplog.clear()
    scaled = tiny_model(positions="rotary", rope_parameters={"rope_type": "yarn", "factor": 2.0})
    with caplog.at_level(logging.WARNING, logger="glade.modeling_glade"):
        scaled(ids)
    assert "past the" not in caplog.text
    assert scaled.config.context_length == 256 and unscaled.config.context_length == 128


def test_generate_past_n_positions_with_scaling_equals_a_slow_loop():
    model = tiny_model(positions="rotary", rope_parameters={"rope_type": "linear", "factor": 2.0})
    prompt = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(1))
    generated = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=256)
    ids = prompt
    with torch.no_grad():
        for _ in range(20):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=-1)
    assert torch.equal(generated, ids) and generated.shape[1] == 140


def test_a_learned_position_config_carries_no_rope_fields(tmp_path):
    config = GladeConfig()
    assert not hasattr(config, "rope_parameters")
    config.save_pretrained(tmp_path)
    assert "rope" not in (tmp_path / "config.json").read_text()
    # Configs saved before the rule hold `"rope_parameters": null`; they still load.
    assert not hasattr(GladeConfig.from_dict({**config.to_dict(), "rope_parameters": None}), "rope_parameters")
