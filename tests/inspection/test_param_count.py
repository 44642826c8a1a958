import re

import pytest

from architectures import MODERN
from glade.loading import read_config_file, read_glade_config
from glade.cli import main
from glade.configuration_glade import GladeConfig
from glade.modeling_glade import GladeForCausalLM, GladeModel
from glade.param_count import count_parameters
from glade.tiny import tiny_config

CONFIGS = {
    "tied, bias": tiny_config(),
    "untied": tiny_config(tie_word_embeddings=False),
    "no bias": tiny_config(bias=False),
    "untied, no bias, odd MLP width": tiny_config(bias=False, tie_word_embeddings=False, n_inner=100, n_layer=3),
    **{f"modern: {name}": tiny_config(**options) for name, options in {
        "rotary": {"positions": "rotary"},
        "rmsnorm": {"norm": "rmsnorm"},
        "rmsnorm, no bias": {"norm": "rmsnorm", "bias": False},
        "qk_norm": {"qk_norm": True},
        "gqa": {"n_kv_head": 1},
        "swiglu": {"activation_function": "swiglu"},
        "every option": {**MODERN, "n_kv_head": 1},
        "nanochat": {"positions": "rotary", "norm": "rmsnorm", "norm_gain": False, "embedding_norm": True,
                     "qk_norm": True, "activation_function": "relu2", "bias": False, "tie_word_embeddings": False},
        "layernorm without gains, embedding norm": {"norm_gain": False, "embedding_norm": True},
        "embedding norm with a gain": {"embedding_norm": True},
        "residual lambdas": {"residual_lambdas": True, "n_layer": 3},
        "value embeddings, odd depth": {"value_embeddings": True, "n_layer": 3},
        "value embeddings, gqa": {"value_embeddings": True, "n_layer": 4, "n_kv_head": 1},
    }.items()},
}


def _component_of(name: str) -> str:
    """Which component of `ParameterCount` a named parameter of GladeForCausalLM belongs to."""
    for pattern, component in (
        (r"transformer\.wte\.", "token_embedding"),
        (r"transformer\.wpe\.", "position_embedding"),
        (r"transformer\.ln_emb\.", "embedding_norm"),
        (r"transformer\.h\.\d+\.ln_[12]\.", "block_layer_norms"),
        (r"transformer\.(value_embeds\.\d+|h\.\d+\.attn\.ve_gate)\.", "value_embeddings"),  # before the rest of attention
        (r"transformer\.h\.\d+\.attn\.", "block_attention"),
        (r"transformer\.h\.\d+\.mlp\.", "block_mlp"),
        (r"transformer\.(resid|x0)_lambdas$", "residual_lambdas"),
        (r"transformer\.ln_f\.", "final_norm"),
        (r"lm_head\.", "head"),
    ):
        if re.match(pattern, name):
            return component
    raise AssertionError(f"unexpected parameter {name}")


@pytest.mark.parametrize("name", CONFIGS)
def test_count_matches_the_instantiated_model(name):
    config = CONFIGS[name]
    model = GladeForCausalLM(config)
    counted = count_parameters(config)

    assert counted.total == sum(p.numel() for p in model.parameters())
    actual = {}
    for param_name, param in model.named_parameters():  # tied weights appear once, under wte
        component = _component_of(param_name)
        actual[component] = actual.get(component, 0) + param.numel()
    per_block = {"block_layer_norms", "block_attention", "block_mlp"}
    for component, number in actual.items():
        expected = getattr(counted, component).count * (config.n_layer if component in per_block else 1)
        assert number == expected, component
    assert counted.head.count == (0 if config.tie_word_embeddings else config.vocab_size * config.n_embd)


def test_gpt2_small_has_its_published_size():
    assert count_parameters(GladeConfig.from_preset("gpt2")).total == 124_439_808


def test_gpt3_175b_is_counted_without_building_it(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(GladeForCausalLM, "__init__", refuse)
    monkeypatch.setattr(GladeModel, "__init__", refuse)
    assert main(["params", "--preset", "gpt3-175b"]) == 0
    out = capsys.readouterr().out

    assert "token embedding (wte)" in out and "50,257 x 12,288 = 617,558,016" in out
    assert "96 blocks" in out
    total = int(re.search(r"^total\s+([\d,]+)", out, re.MULTILINE).group(1).replace(",", ""))
    assert 174e9 < total < 176e9
    assert total == count_parameters(GladeConfig.from_preset("gpt3-175b")).total


def test_params_of_a_checkpoint_and_of_a_config_file(tmp_path, capsys):
    config = tiny_config(bias=False, tie_word_embeddings=False)
    model = GladeForCausalLM(config)
    model.save_pretrained(tmp_path / "ckpt")
    expected = f"{sum(p.numel() for p in model.parameters()):,}"

    assert main(["params", "--model", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^total\s+{expected} ", out, re.MULTILINE)
    assert re.search(r"^head \(lm_head\)\s+64 x 257 = 16,448$", out, re.MULTILINE)

    config.to_json_file(tmp_path / "config.json")
    assert main(["params", "--config", str(tmp_path / "config.json")]) == 0
    assert re.search(rf"^total\s+{expected} ", capsys.readouterr().out, re.MULTILINE)


def test_non_glade_and_missing_sources_are_clear_errors(tmp_path, bert_dir, capsys):
    with pytest.raises(ValueError, match="is not a glade config \\(model_type='bert', expected 'glade'\\)"):
        read_glade_config(str(bert_dir))
    with pytest.raises(FileNotFoundError, match="model directory .*missing does not exist"):
        read_glade_config(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        read_glade_config(str(tmp_path))
    with pytest.raises(ValueError, match="is not a glade config \\(model_type='bert'"):
        read_config_file(bert_dir / "config.json")

    with pytest.raises(SystemExit) as exit_info:
        main(["params", "--model", str(bert_dir)])
    assert exit_info.value.code == 2
    assert "is not a glade config" in capsys.readouterr().err
