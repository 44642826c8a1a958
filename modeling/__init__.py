"""Glade: a GPT that is a first-class Hugging Face transformers model.

Importing this package registers Glade with transformers' Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM` and the task heads resolve `model_type="glade"` checkpoints.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_glade import PRESETS, GladeConfig
from .modeling_glade import (
    GladeForCausalLM,
    GladeForQuestionAnswering,
    GladeForSequenceClassification,
    GladeForTokenClassification,
    GladeModel,
    GladePreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register("glade", GladeConfig, exist_ok=True)
for _auto, _model in (
    (AutoModel, GladeModel),
    (AutoModelForCausalLM, GladeForCausalLM),
    (AutoModelForSequenceClassification, GladeForSequenceClassification),
    (AutoModelForTokenClassification, GladeForTokenClassification),
    (AutoModelForQuestionAnswering, GladeForQuestionAnswering),
):
    _auto.register(GladeConfig, _model, exist_ok=True)

# Saved checkpoints carry the flat modeling files (transformers copies each module the auto classes name and every
# module those import relatively), so they load with trust_remote_code=True without glade.
REMOTE_CODE_FILES = (
    "configuration_glade.py", "modeling_glade.py", "kernels_glade.py", "fast_generate.py", "decoding.py",
    "sampling.py", "hardware.py", "native_decoding.py",
)
GladeConfig.register_for_auto_class()
GladeModel.register_for_auto_class("AutoModel")
GladeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "PRESETS",
    "REMOTE_CODE_FILES",
    "GladeConfig",
    "GladeModel",
    "GladePreTrainedModel",
    "GladeForCausalLM",
    "GladeForSequenceClassification",
    "GladeForTokenClassification",
    "GladeForQuestionAnswering",
]
