"""AdamW with GPT-style weight decay, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices that multiply activations: not biases, LayerNorm gains or embeddings (which the tied
    output head shares), where decay only pulls useful scales towards zero."""
    no_decay = {
        id(param)
        for module in model.modules()
        if isinstance(module, NO_DECAY_MODULES)
        for param in module.parameters(recurse=False)
    }
    decay, keep = [], []
    for name, param in model.named_parameters():  # tied parameters are listed once
        if not param.requires_grad:
            continue
        (keep if id(param) in no_decay or name.endswith("bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool
) -> torch.optim.AdamW:
    """`fused` runs the whole update in one kernel; otherwise torch picks its multi-tensor (foreach) path."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_lr: float):
    """Linear warmup to the optimizer's lr, then half a cosine down to `min_lr` at `max_steps`."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps, min_lr=min_lr
    )
