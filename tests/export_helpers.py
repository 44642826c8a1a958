"""A saved tiny Glade checkpoint whose every tensor matters, for the export tests."""

from pathlib import Path

import torch

from glade import GladeForCausalLM
from glade.tiny import byte_level_tokenizer, tiny_model


def saved_random_glade(directory: Path, **options) -> GladeForCausalLM:
    """A tiny Glade model with every tensor randomised (init leaves norms at 1 and biases at 0, which would hide a
    mixed-up or dropped one), saved to `directory` with a byte-level tokenizer."""
    model = tiny_model(**options)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return model
