"""The table of export families: every config picks one family, and what no family has is refused by name."""

import itertools

import gguf
import pytest

from glade import GladeConfig
from glade.conversion import FAMILIES, family_for

# Every value of each field that picks a family, as the table lists them.
PICKING_VALUES = {
    name: sorted({value for family in FAMILIES.values() for value in family.expresses[name]}, key=repr)
    for name in dict.fromkeys(name for family in FAMILIES.values() for name in family.picked_by)
}
PICKS = {  # (positions, norm, qk_norm) -> family
    ("learned", "layernorm", False): "gpt2", ("learned", "layernorm", True): "gpt2",
    ("learned", "rmsnorm", False): "gpt2", ("learned", "rmsnorm", True): "gpt2",
    ("rotary", "layernorm", False): "gpt_neox", ("rotary", "layernorm", True): "gpt_neox",
    ("rotary", "rmsnorm", False): "llama", ("rotary", "rmsnorm", True): "qwen3",
}


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
    assert list(PICKING_VALUES) == ["positions", "norm", "qk_norm"]
    for values, name in PICKS.items():
        assert family_for(GladeConfig(n_embd=64, n_head=4, **dict(zip(PICKING_VALUES, values)))) is FAMILIES[name]


def test_each_entry_is_keyed_by_its_model_type_and_names_a_llama_cpp_architecture():
    for name, family in FAMILIES.items():
        assert family.model_class.config_class.model_type == name
        assert family.gguf.arch in gguf.MODEL_ARCH_NAMES.values()
        assert set(family.picked_by) <= set(family.expresses)
        assert set(family.gguf.narrows) <= set(family.expresses)


def test_a_config_no_family_picks_is_refused_naming_what_no_family_has():
    config = GladeConfig(n_embd=64, n_head=4)
    object.__setattr__(config, "positions", "alibi")  # past GladeConfig's own validation: a future option
    with pytest.raises(ValueError, match=r"^Glade config uses positions='alibi', which no export family "
                                         r"\(gpt2, gpt_neox, llama, qwen3\) expresses$"):
        family_for(config)


def test_a_family_refuses_every_option_it_does_not_compute_and_llama_cpp_what_its_graph_does_not():
    config = GladeConfig(n_embd=64, n_head=4, positions="rotary", activation_function="gelu", n_kv_head=2)
    family = family_for(config)
    with pytest.raises(ValueError, match="^Glade config uses n_kv_head=2, which GPTNeoXForCausalLM cannot express$"):
        family.stock_config(config)
    with pytest.raises(ValueError, match="^Glade config uses activation_function='gelu', n_kv_head=2, which "
                                         "llama.cpp's gptneox architecture cannot express$"):
        family.check_gguf(config)
