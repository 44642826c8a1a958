"""transformers' common model tests (CausalLMModelTest = ModelTesterMixin + GenerationTesterMixin +
PipelineTesterMixin + TrainingTesterMixin + TensorParallelTesterMixin + FSDPTesterMixin) run against Glade.

Mirrors tests/models/llama/test_modeling_llama.py and tests/models/gpt2/test_modeling_gpt2.py: a CausalLMModelTester
subclass that names the classes, and CausalLMModelTest subclasses that name the tester. Nothing here works around a
Glade behaviour: failures are the measurement.
"""

import unittest

from transformers import is_torch_available
from transformers.testing_utils import require_torch

from ...causal_lm_tester import CausalLMModelTest, CausalLMModelTester


if is_torch_available():
    from glade import (
        GladeConfig,
        GladeForCausalLM,
        GladeForQuestionAnswering,
        GladeForSequenceClassification,
        GladeForTokenClassification,
        GladeModel,
    )
    from glade.modeling_glade import GladeRotaryEmbedding


def _register_glade_as_in_tree():
    """Give Glade the entries an in-tree model (like Llama) has in transformers' auto name tables.

    The common tests decide per class what to do (add labels, skip base models in training, ...) from
    ``get_values(MODEL_*_MAPPING_NAMES)``, which an out-of-tree ``AutoModel.register`` does not touch. The lazy
    mappings built on these tables import ``transformers.models.<model_type>``, so ``glade`` is aliased there, and
    their reverse config maps (built at import) learn GladeConfig. Glade's own ``Auto*.register`` entries
    (``_extra_content``) are dropped so the lazy mappings list Glade once, from the tables, as for an in-tree model.
    """
    import sys

    import glade
    from transformers.models.auto import auto_mappings, configuration_auto, modeling_auto
    from transformers.models.auto.auto_factory import _LazyAutoMapping

    sys.modules.setdefault("transformers.models.glade", glade)
    tables = {
        "MODEL_MAPPING_NAMES": "GladeModel",
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "GladeForCausalLM",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "GladeForSequenceClassification",
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "GladeForTokenClassification",
        "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": "GladeForQuestionAnswering",
    }
    for name, cls_name in tables.items():
        getattr(modeling_auto, name)["glade"] = cls_name
    config_tables = (configuration_auto.CONFIG_MAPPING_NAMES, auto_mappings.CONFIG_MAPPING_NAMES)
    for config_names in {id(table): table for table in config_tables}.values():
        config_names["glade"] = "GladeConfig"
    configuration_auto.CONFIG_MAPPING._extra_content.pop("glade", None)
    for value in vars(modeling_auto).values():
        if isinstance(value, _LazyAutoMapping):
            value._reverse_config_mapping["GladeConfig"] = "glade"
            value._extra_content.pop(GladeConfig, None)


if is_torch_available():
    _register_glade_as_in_tree()


class GladeModelTester(CausalLMModelTester):
    # Glade options on top of the tester's defaults: extra kwargs become tester attributes, and get_config() forwards
    # every attribute named like a GladeConfig argument. The default is GPT-2's architecture.
    options: dict = dict(positions="learned", norm="layernorm", activation_function="gelu_new")

    if is_torch_available():
        config_class = GladeConfig
        base_model_class = GladeModel
        causal_lm_class = GladeForCausalLM
        sequence_classification_class = GladeForSequenceClassification
        token_classification_class = GladeForTokenClassification
        question_answering_class = GladeForQuestionAnswering

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **{**self.options, **kwargs})


class GladeRotaryModelTester(GladeModelTester):
    """Rotary + RMSNorm + QK-norm + SwiGLU + GQA (4 query heads, 2 kv heads) + logit soft-capping."""

    options = dict(num_attention_heads=4, num_key_value_heads=2, positions="rotary", norm="rmsnorm", qk_norm=True,
                   activation_function="swiglu", logit_softcap=30.0)


class GladeNanochatModelTester(GladeModelTester):
    """The nanochat preset's options: gainless norms, embedding norm, QK-norm after RoPE, relu2, no biases, untied."""

    options = dict(num_attention_heads=4, num_key_value_heads=2, positions="rotary", norm="rmsnorm", norm_gain=False,
                   embedding_norm=True, qk_norm=True, activation_function="relu2", bias=False,
                   tie_word_embeddings=False, logit_softcap=15.0)


_PIPELINE_MAPPING = (
    {
        "feature-extraction": GladeModel,
        "text-generation": GladeForCausalLM,
        "text-classification": GladeForSequenceClassification,
        "token-classification": GladeForTokenClassification,
        "question-answering": GladeForQuestionAnswering,
        "zero-shot": GladeForSequenceClassification,
    }
    if is_torch_available()
    else {}
)


class GladeCommonTest(CausalLMModelTest):
    """What the three configurations share (not collected: no unittest.TestCase)."""

    pipeline_model_mapping = _PIPELINE_MAPPING
    # used in `test_torch_compile_for_training`
    _torch_compile_train_cls = GladeForCausalLM if is_torch_available() else None
    # test_can_init_all_missing_weights skips models whose config file has no '# Copyright <year>' header, or one older
    # than 2023; configuration_glade.py has none, while a model added in-tree today would carry a recent year.
    test_can_init_all_missing_weights_before_2023 = True

    def test_tester_builds_intended_config(self):
        # Harness self-check: the tester really produces the configuration this class claims to test.
        config = self.model_tester.get_config()
        for name, value in self.model_tester.options.items():
            self.assertEqual(getattr(config, name), value, name)


@require_torch
class GladeModelTest(GladeCommonTest, unittest.TestCase):
    """Default GPT-2-shaped configuration (learned positions, LayerNorm, gelu_new, MHA)."""

    model_tester_class = GladeModelTester


@require_torch
class GladeRotaryModelTest(GladeCommonTest, unittest.TestCase):
    """positions='rotary', norm='rmsnorm', qk_norm, swiglu, n_kv_head=2 of 4 heads, logit_softcap=30."""

    model_tester_class = GladeRotaryModelTester
    # transformers <= ~5.0 read this to enable the RoPE tests; 5.25's ModelTesterMixin finds the RoPE module itself.
    rotary_embedding_layer = GladeRotaryEmbedding if is_torch_available() else None


@require_torch
class GladeNanochatModelTest(GladeCommonTest, unittest.TestCase):
    """The nanochat preset's options (norm_gain=False, embedding_norm, qk_norm, relu2, no biases, untied, cap 15)."""

    model_tester_class = GladeNanochatModelTester
