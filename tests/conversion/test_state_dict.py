"""The pure state-dict maps: prefixes, buffers, transposes, heads, shape checks."""

import pytest
import torch

from glade import GladeForCausalLM
from glade.conversion import glade_config_from_gpt2, glade_to_gpt2, gpt2_to_glade, nanogpt_to_glade
from glade.conversion.state_dict import model_from_state_dict, normalize_keys


@pytest.fixture
def config(gpt2_model):
    return glade_config_from_gpt2(gpt2_model.config)


def test_gpt2_to_glade_transposes_exactly_the_conv1d_weights(gpt2_model, config):
    source = gpt2_model.state_dict()
    converted = gpt2_to_glade(source, config)
    transposed = {key for key in source if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))}
    assert len(transposed) == 4 * config.n_layer
    for key, tensor in source.items():
        expected = tensor.t() if key in transposed else tensor
        assert torch.equal(converted[key], expected), key
    # The tied head is filled in from the embedding, so the dict loads strictly.
    assert torch.equal(converted["lm_head.weight"], source["transformer.wte.weight"])
    GladeForCausalLM(config).load_state_dict(converted, strict=True)


def test_glade_to_gpt2_inverts_gpt2_to_glade_bitwise(gpt2_model, config):
    source = {key: t for key, t in gpt2_model.state_dict().items() if key != "lm_head.weight"}
    back = glade_to_gpt2(gpt2_to_glade(source, config), config)
    assert back.keys() == source.keys()
    for key in source:
        assert torch.equal(back[key], source[key]) and back[key].dtype == source[key].dtype, key


def test_normalize_keys_adds_prefix_strips_compile_prefix_and_drops_mask_buffers():
    tensor = torch.zeros(1)
    state_dict = {
        "wte.weight": tensor,
        "h.0.attn.bias": tensor,
        "h.0.attn.masked_bias": tensor,
        "h.0.attn.c_attn.bias": tensor,
        "_orig_mod.transformer.h.1.attn.bias": tensor,
        "_orig_mod.transformer.ln_f.weight": tensor,
        "_orig_mod.lm_head.weight": tensor,
    }
    assert sorted(normalize_keys(state_dict)) == [
        "lm_head.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.ln_f.weight",
        "transformer.wte.weight",
    ]


def test_normalize_keys_refuses_a_key_given_twice():
    with pytest.raises(ValueError, match="transformer.wte.weight.*twice"):
        normalize_keys({"wte.weight": torch.zeros(1), "transformer.wte.weight": torch.zeros(1)})


def test_shape_check_names_missing_unexpected_and_misshaped_tensors(gpt2_model, config):
    state_dict = dict(gpt2_model.state_dict())
    del state_dict["transformer.h.1.mlp.c_fc.bias"]
    state_dict["transformer.h.0.attn.extra"] = torch.zeros(3)
    state_dict["transformer.h.0.attn.c_attn.weight"] = torch.zeros(64, 191)
    with pytest.raises(ValueError) as error:
        gpt2_to_glade(state_dict, config)
    message = str(error.value)
    assert "missing transformer.h.1.mlp.c_fc.bias" in message
    assert "unexpected transformer.h.0.attn.extra" in message
    assert "transformer.h.0.attn.c_attn.weight has shape [191, 64]" in message and "[192, 64]" in message


def test_a_tied_head_that_differs_from_the_embedding_is_refused(gpt2_model, config):
    state_dict = dict(gpt2_model.state_dict())
    state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs from transformer.wte.weight"):
        gpt2_to_glade(state_dict, config)


def test_untied_heads_are_kept_and_required(make_gpt2):
    model = make_gpt2(tie_word_embeddings=False)
    config = glade_config_from_gpt2(model.config)
    state_dict = model.state_dict()
    assert not torch.equal(state_dict["lm_head.weight"], state_dict["transformer.wte.weight"])
    converted = gpt2_to_glade(state_dict, config)
    assert torch.equal(converted["lm_head.weight"], state_dict["lm_head.weight"])
    with pytest.raises(ValueError, match="missing lm_head.weight"):
        gpt2_to_glade({k: t for k, t in state_dict.items() if k != "lm_head.weight"}, config)


def test_nanogpt_vocab_crop_keeps_the_leading_rows(nanogpt, tmp_path):
    from glade.conversion import glade_config_from_nanogpt

    _, state_dict, model_args = nanogpt(tmp_path / "ckpt.pt", vocab_size=256)
    config = glade_config_from_nanogpt(model_args, vocab_size=250)
    converted = nanogpt_to_glade(state_dict, config)
    assert torch.equal(converted["transformer.wte.weight"], state_dict["transformer.wte.weight"][:250])
    assert converted["lm_head.weight"] is converted["transformer.wte.weight"]
    with pytest.raises(ValueError, match="Cannot crop the vocabulary to 300: the checkpoint has 256"):
        nanogpt_to_glade(state_dict, glade_config_from_nanogpt(model_args, vocab_size=300))


def test_model_from_state_dict_uses_the_tensors_and_ties_the_head(gpt2_model, config):
    converted = gpt2_to_glade(gpt2_model.state_dict(), config)
    model = model_from_state_dict(GladeForCausalLM, config, converted)
    assert not model.training
    assert model.lm_head.weight is model.transformer.wte.weight
    c_attn = converted["transformer.h.0.attn.c_attn.weight"]
    assert model.transformer.h[0].attn.c_attn.weight.data_ptr() == c_attn.data_ptr()
    without_final_bias = {k: t for k, t in converted.items() if k != "transformer.ln_f.bias"}
    with pytest.raises(ValueError, match="No weights for transformer.ln_f.bias"):
        model_from_state_dict(GladeForCausalLM, config, without_final_bias)
