"""The Accelerator a run trains with: plain, DDP, FSDP2 or DeepSpeed, on GPUs or on CPU processes over gloo.

accelerate 1.x turns an FSDP launch into FSDP only on accelerator devices: on a CPU-only machine (or with
`use_cpu: true`) every process of `accelerate launch --config_file fsdp.yaml` comes up as an independent
single-process run, so all of them train alone and race to write the same files. torch's FSDP2 (`fully_shard`)
itself runs on CPU tensors over gloo, so Glade starts such a launch as a CPU process group (gloo) and then
hands accelerate the FSDP plugin it would have built on GPUs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    broadcast_object_list,
    is_bf16_available,
)
from accelerate.utils.environment import parse_flag_from_env

logger = logging.getLogger(__name__)


def cpu_launch_of(backend: str, honour_use_cpu: bool = False) -> bool:
    """`accelerate launch` of several processes with `backend` ("FSDP", "DEEPSPEED") that will run on CPUs: no
    accelerator here, or (where the launcher passes it on) `use_cpu`."""
    on_cpu = not torch.accelerator.is_available() or (honour_use_cpu and parse_flag_from_env("ACCELERATE_USE_CPU"))
    return parse_flag_from_env(f"ACCELERATE_USE_{backend}") and int(os.environ.get("WORLD_SIZE", "1")) > 1 and on_cpu


def launch_device() -> torch.device:
    """The kind of device this process will train on, known before the Accelerator exists (its precision depends on
    it)."""
    if parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available():
        return torch.device("cpu")
    return torch.device(torch.accelerator.current_accelerator().type)


def make_accelerator(mixed_precision: str, **kwargs: Any) -> Accelerator:
    """An Accelerator for this launch; under an FSDP launch on CPUs, an FSDP2 one over gloo."""
    if mixed_precision == "bf16" and not is_bf16_available():
        logger.warning("bf16 is not supported on this device: training in fp32")
        mixed_precision = "no"
    if cpu_launch_of("DEEPSPEED"):
        # DeepSpeed's CPU accelerator talks over gloo; accelerate would ask for its GPU default (nccl).
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if not cpu_launch_of("FSDP", honour_use_cpu=True):
        return Accelerator(mixed_precision=mixed_precision, **kwargs)
    # Read the FSDP_* settings before the Accelerator exists: they describe what the launch asked for.
    plugin = FullyShardedDataParallelPlugin()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True, **kwargs)
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(
            f"FSDP on CPU: expected a gloo process group, accelerate set up {accelerator.distributed_type.value}"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def can_fuse_optimizer(accelerator: Accelerator) -> bool:
    # Fused AdamW kernels exist for plain CPU and CUDA tensors; FSDP's sharded DTensors and DeepSpeed's own
    # optimizer wrapper take torch's default (foreach) path instead.
    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    return plain and accelerator.device.type in ("cpu", "cuda")


T = TypeVar("T")


def main_process_decides(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """`decide()`, run by the main process only: every rank returns its result, or raises its error."""
    verdict: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            verdict = [decide()]
        except Exception as error:  # the other ranks must hear of any failure, or they would wait forever
            verdict = [error]
    broadcast_object_list(verdict)
    if isinstance(verdict[0], Exception):
        raise verdict[0]
    return verdict[0]
