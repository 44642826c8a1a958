import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from glade import GladeConfig, GladeForCausalLM
from glade.param_count import count_parameters
from glade.tiny import tiny_config


def test_defaults_are_gpt2_124m():
    config = GladeConfig()
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head) == (
        50257, 1024, 768, 12, 12,
    )
    assert config.n_inner == 4 * 768
    assert config.activation_function == "gelu_new"
    assert config.bias and config.tie_word_embeddings
    assert config.bos_token_id == config.eos_token_id == 50256


def test_canonical_names_read_and_write_gpt2_fields():
    config = GladeConfig(n_embd=64, n_head=4, n_layer=3, n_positions=32, vocab_size=100)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 4, 3)
    assert (config.max_position_embeddings, config.intermediate_size) == (32, 256)
    config.num_hidden_layers = 5
    assert config.n_layer == 5


# Parameters of the released GPT-2 checkpoints (transformers' GPT2LMHeadModel with OpenAI's shapes), and GPT-3's
# sizes as table 2.1 of Brown et al. 2020 rounds them (1.3B and 13B as the comment on glade.PRESETS explains).
RELEASED_SIZES = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                  "gpt2-xl": 1_557_611_200}
PAPER_SIZES = {"gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9, "gpt3-2.7b": 2.7e9,
               "gpt3-6.7b": 6.7e9, "gpt3-13b": 13e9, "gpt3-175b": 175e9}


@pytest.mark.parametrize("name", [*RELEASED_SIZES, *PAPER_SIZES])
def test_gpt_presets_have_the_published_sizes(name):
    total = count_parameters(GladeConfig.from_preset(name)).total  # counted exactly as built: tests/inspection
    if name in RELEASED_SIZES:
        assert total == RELEASED_SIZES[name]
    else:
        assert total == pytest.approx(PAPER_SIZES[name], rel=0.02)


def test_preset_overrides_replace_only_the_fields_named():
    config = GladeConfig.from_preset("gpt2-medium", n_layer=6, vocab_size=8192)
    assert (config.n_layer, config.vocab_size, config.n_head, config.n_embd) == (6, 8192, 16, 1024)


def test_config_round_trips_through_json(tmp_path):
    config = GladeConfig(n_embd=64, n_head=4, n_layer=2, vocab_size=300, bias=False, activation_function="gelu")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GladeConfig)
    saved, original = loaded.to_dict(), config.to_dict()
    saved.pop("_name_or_path"), original.pop("_name_or_path")
    assert saved == original


def test_layer_norm_epsilon_is_what_every_layer_norm_computes_with():
    model = GladeForCausalLM(tiny_config(layer_norm_epsilon=0.5))
    norms = [module for module in model.modules() if isinstance(module, torch.nn.LayerNorm)]
    assert len(norms) == 2 * model.config.n_layer + 1
    hidden = torch.randn(3, model.config.n_embd) * 0.1  # a variance well below epsilon, so epsilon shows
    for norm in norms:
        expected = F.layer_norm(hidden, norm.normalized_shape, norm.weight, norm.bias, eps=0.5)
        torch.testing.assert_close(norm(hidden), expected)
        assert not torch.allclose(norm(hidden), F.layer_norm(hidden, norm.normalized_shape, norm.weight, norm.bias))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_embd": 100, "n_head": 3}, r"n_embd \(100\) must be divisible by n_head \(3\)"),
        ({"n_layer": 0}, r"n_layer must be positive, got 0"),
        ({"vocab_size": -5}, r"vocab_size must be positive, got -5"),
        ({"n_inner": 0}, r"n_inner must be positive, got 0"),
        ({"attn_pdrop": 1.0}, r"attn_pdrop must be in \[0, 1\), got 1.0"),
        ({"resid_pdrop": -0.1}, r"resid_pdrop must be in \[0, 1\), got -0.1"),
        ({"activation_function": "relu"}, r"activation_function must be one of .*got 'relu'"),
        ({"vocab_size": 100, "eos_token_id": 100}, r"eos_token_id=100 is outside the vocabulary \(vocab_size=100\)"),
        ({"pad_token_id": -1}, r"pad_token_id=-1 is outside the vocabulary"),
        ({"n_embd": "768"}, r"n_embd must be an int, got '768' \(str\)"),
        ({"n_layer": 2.5}, r"n_layer must be an int, got 2.5 \(float\)"),
        ({"bias": "yes"}, r"bias must be a bool"),
        ({"layer_norm_epsilon": 0.0}, r"layer_norm_epsilon must be positive"),
        ({"layer_norm_epsilon": math.nan}, r"layer_norm_epsilon must be a finite number, got nan"),
        ({"layer_norm_epsilon": math.inf}, r"layer_norm_epsilon must be a finite number, got inf"),
        ({"initializer_range": math.nan}, r"initializer_range must be a finite number, got nan"),
        ({"attn_pdrop": math.nan}, r"attn_pdrop must be a finite number, got nan"),
        ({"logit_softcap": math.inf}, r"logit_softcap must be a positive number or None, got inf"),
        ({"logit_softcap": math.nan}, r"logit_softcap must be a positive number or None, got nan"),
        ({"positions": "rotary", "rope_parameters": {"rope_type": "default", "rope_theta": math.nan}},
         r"rope_parameters\['rope_theta'\] must be a positive finite number, got nan"),
    ],
)
def test_bad_config_values_raise_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        GladeConfig(**fields)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match=r"Unknown preset 'gpt5'.*gpt2-medium"):
        GladeConfig.from_preset("gpt5")


@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu2", "swiglu"])
@pytest.mark.parametrize("options", [
    {}, {"positions": "rotary", "norm": "rmsnorm", "qk_norm": True, "n_kv_head": 2, "bias": False},
    {"tie_word_embeddings": False, "logit_softcap": 30.0},
], ids=["gpt2", "modern", "untied"])
def test_the_tensor_parallel_plan_names_only_modules_the_config_builds(activation, options):
    config = GladeConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=128, n_positions=32,
                         activation_function=activation, **options)
    with torch.device("meta"):
        modules = [name for name, _ in GladeForCausalLM(config).transformer.named_modules()]
    planned = {}
    for pattern in config.base_model_tp_plan:
        planned[pattern] = [name for name in modules if re.fullmatch(re.escape(pattern).replace(r"\*", r"\d+"), name)]
    assert all(planned.values()), planned  # transformers refuses an entry that matches no module
    assert ("h.*.mlp.c_gate" in planned) == (activation == "swiglu")
    assert {"wte", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj"} <= planned.keys()
