"""Damaged checkpoints, for tests that loading refuses them."""

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def rewrite_weights(directory: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Apply `edit` to the tensors of `directory/model.safetensors` and save them back."""
    path = Path(directory) / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
