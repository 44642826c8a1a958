"""Measurement: alternating timers, the machine's matmul peak, and what the numbers were measured on."""

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from tqdm import tqdm

from glade.hardware import cpu_name, cpuinfo_field, native_bf16


@dataclass
class Samples:
    """Wall-clock and process CPU seconds of each timed call. CPU time counts the work done by every thread, not the
    time spent waiting for a core, so it is kept beside wall time as a cross-check under load."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    @property
    def median_wall_s(self) -> float:
        return statistics.median(self.wall_s)


def alternate(calls: dict[str, Callable[[], object]], warmup: int, repeats: int, label: str) -> dict[str, Samples]:
    """Time each call `repeats` times, interleaved (A B C, B C A, C A B, ...) so that a burst of load from elsewhere
    hits every contestant alike; `warmup` untimed rounds first (compilation, allocator and cache warm-up)."""
    names = list(calls)
    samples = {name: Samples() for name in names}
    with tqdm(total=(warmup + repeats) * len(names), desc=label, leave=False) as progress:
        for _ in range(warmup):
            for name in names:
                calls[name]()
                progress.update()
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                wall, cpu = time.perf_counter(), time.process_time()
                calls[name]()
                samples[name].wall_s.append(time.perf_counter() - wall)
                samples[name].cpu_s.append(time.process_time() - cpu)
                progress.update()
    return samples


def seconds(function: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def best_seconds(function: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls, after one untimed call (kernel selection, caches, compilation)."""
    function()
    return min(seconds(function) for _ in range(repeats))


def matmul_peak_flops(dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best FLOP/s of a square `size`^3 matmul: the ceiling that MFU is measured against."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / best_seconds(lambda: a @ b, repeats)


def cpu_flags() -> list[str]:
    """The instruction sets that decide bf16 matmul speed on x86."""
    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    return sorted(wanted & set((cpuinfo_field("flags") or "").split()))


BF16_CHOICES = ("auto", "always", "never")


def measured_dtypes(bf16: str) -> tuple[str, ...]:
    """The dtypes to measure ("fp32", "bf16"), the one `glade pretrain` would train in first: with `auto`, bf16 only
    where the CPU computes it natively, since emulated bf16 measures the emulation."""
    native = native_bf16("cpu")
    if bf16 == "never" or (bf16 == "auto" and not native):
        return ("fp32",)
    return ("bf16", "fp32") if native else ("fp32", "bf16")


def machine_info() -> dict:
    return {
        "cpu_model": cpu_name(),
        "cpu_flags": cpu_flags(),
        "native_bf16": native_bf16("cpu"),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def thread_info() -> dict:
    return {
        "torch_num_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: how busy the machine was besides this benchmark."""
    return [round(value, 2) for value in os.getloadavg()]
