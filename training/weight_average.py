"""`--ema-decay`: an exponential moving average of the weights, which validation reads and `final/` exports.

Averaging the weights of the last steps (Polyak; the EMA of the 2025 data-limited speedruns) smooths the noise of
the final updates. The average lives in fp32 beside the model, is saved with every checkpoint (so a resumed run
continues it bit for bit) and is swapped into the model only while it is evaluated or exported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.utils import DistributedType
from torch import nn

# The average is kept per parameter on each process: these launches hand every process only a shard of it.
SHARDED = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}


def check_average_fits(decay: float, distributed_type: DistributedType) -> None:
    """Refuse --ema-decay under a launch that shards the weights, before any work is done."""
    if decay and distributed_type in SHARDED:
        raise ValueError(f"--ema-decay averages whole weights on each process, but {SHARDED[distributed_type]} "
                         "shards them: use DDP or one process, or --ema-decay 0")


def warmed_up_decay(decay: float, step: int) -> float:
    """The decay after optimizer step `step` (1, 2, ...): (1 + step) / (10 + step) until that reaches `decay`, so
    the first steps, far from the initial weights, are not averaged with them."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """The exponential moving average of a model's parameters (tied ones once), in fp32."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.averages = [param.detach().float().clone() for param in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1 - warmed_up_decay(self.decay, step)
        for average, param in zip(self.averages, model.parameters(), strict=True):
            average.lerp_(param.detach().float(), weight)

    @contextmanager
    @torch.no_grad()
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model holds the averaged weights (in its own dtype) inside the block, its trained ones after it."""
        params = list(model.parameters())
        trained = [param.detach().clone() for param in params]
        for param, average in zip(params, self.averages, strict=True):
            param.copy_(average)
        try:
            yield
        finally:
            for param, weights in zip(params, trained):
                param.copy_(weights)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "averages": self.averages}

    def load_state_dict(self, state: dict) -> None:
        for average, saved in zip(self.averages, state["averages"], strict=True):
            average.copy_(saved)
