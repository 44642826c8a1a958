"""The table of export families: every config picks one family, and what no family has is refused by name."""

import itertools
from dataclasses import fields

import gguf
import pytest

from glade import GladeConfig
from glade.conversion import FAMILIES, family_for
from glade.conversion.families import ROPE_OPTIONS

# Every value of each field that picks a family, as the table lists them.
PICKING_VALUES = {
    name: sorted({value for family in FAMILIES.values() for value in family.expresses[name]}, key=repr)
    for name in dict.fromkeys(name for family in FAMILIES.values() for name in family.picked_by)
}
PICKS = {  # (positions, norm, qk_norm), with gains on the norms and none on the embeddings -> family
    ("learned", "layernorm", False): "gpt2", ("learned", "layernorm", True): "gpt2",
    ("learned", "rmsnorm", False): "gpt2", ("learned", "rmsnorm", True): "gpt2",
    ("rotary", "layernorm", False): "gpt_neox", ("rotary", "layernorm", True): "gpt_neox",
    ("rotary", "rmsnorm", False): "llama", ("rotary", "rmsnorm", True): "qwen3",
}
NANOCHAT_PICKS = {"positions": "rotary", "norm": "rmsnorm", "qk_norm": True, "norm_gain": False, "embedding_norm": True}


@pytest.mark.parametrize(
    "values", list(itertools.product(*PICKING_VALUES.values())), ids=lambda values: "-".join(map(str, values))
)
def test_every_config_picks_one_most_specific_family(values):
    config = GladeConfig(n_embd=64, n_head=4, **dict(zip(PICKING_VALUES, values)))
    picking = [family for family in FAMILIES.values() if family.picks(config)]
    most_specific = max(len(family.picked_by) for family in picking)
    [picked] = [family for family in picking if len(family.picked_by) == most_specific]
    assert family_for(config) is picked


def test_the_picking_options_pick_these_families():
    assert list(PICKING_VALUES) == ["positions", "norm", "qk_norm", "norm_gain", "embedding_norm"]
    for values, name in PICKS.items():
        options = dict(zip(["positions", "norm", "qk_norm"], values))
        assert family_for(GladeConfig(n_embd=64, n_head=4, **options)) is FAMILIES[name]
    assert family_for(GladeConfig(n_embd=64, n_head=4, **NANOCHAT_PICKS)) is FAMILIES["nanochat"]
    # One of nanochat's options alone leaves the config with the family it had, which names it in its refusal.
    config = GladeConfig(n_embd=64, n_head=4, activation_function="swiglu", bias=False,
                         **{**NANOCHAT_PICKS, "embedding_norm": False})
    with pytest.raises(ValueError, match="^Glade config uses norm_gain=False, which Qwen3ForCausalLM cannot express$"):
        family_for(config).stock_config(config)


def test_each_entry_is_keyed_by_its_model_type_and_names_a_llama_cpp_architecture_or_why_none():
    option_names = {field.name for field in fields(GladeConfig)} | set(ROPE_OPTIONS)
    for name, family in FAMILIES.items():
        assert family.model_class.config_class.model_type == name
        assert set(family.picked_by) <= set(family.expresses) <= option_names
        if family.gguf is None:
            assert family.gguf_refusal and set(family.gguf_refusal) <= option_names
        for architecture in filter(None, (family.gguf, *family.gguf_alternatives)):
            assert architecture.arch in gguf.MODEL_ARCH_NAMES.values()
            assert set(architecture.narrows) <= set(family.expresses)


def test_a_config_no_family_picks_is_refused_naming_what_no_family_has():
    config = GladeConfig(n_embd=64, n_head=4)
    object.__setattr__(config, "positions", "alibi")  # past GladeConfig's own validation: a future option
    with pytest.raises(ValueError, match=r"^Glade config uses positions='alibi', which no export family "
                                         r"\(gpt2, gpt_neox, llama, qwen3, nanochat\) expresses$"):
        family_for(config)


def test_a_gpt_neox_config_goes_to_the_llama_cpp_architecture_computing_its_activation():
    config = GladeConfig(n_embd=64, n_head=4, positions="rotary")
    assert family_for(config).gguf_architecture(config).arch == "gptneox"
    config = GladeConfig(n_embd=64, n_head=4, positions="rotary", activation_function="relu2")
    assert family_for(config).gguf_architecture(config).arch == "nemotron"


def test_a_family_refuses_every_option_it_does_not_compute_and_llama_cpp_what_its_graph_does_not():
    config = GladeConfig(n_embd=64, n_head=4, positions="rotary", activation_function="gelu", n_kv_head=2)
    family = family_for(config)
    with pytest.raises(ValueError, match="^Glade config uses n_kv_head=2, which GPTNeoXForCausalLM cannot express$"):
        family.stock_config(config)
    with pytest.raises(ValueError, match="^Glade config uses activation_function='gelu', n_kv_head=2, which "
                                         "llama.cpp's gptneox architecture cannot express$"):
        family.gguf_architecture(config)
