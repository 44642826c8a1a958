"""The machine something runs on: what reports and model cards state, and which precision it computes bf16 in natively.

A CPU without bf16 instructions still runs bf16 autocast, by converting every operand to fp32 and back: on an AVX2-only
AMD EPYC (Zen 3) a glade-small training step ran 20x slower under bf16 autocast than in fp32. So bf16 is a default only
where the device computes it natively.
"""

import logging
import platform
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
# x86 instruction sets with bf16 arithmetic: AVX512-BF16 (Zen 4, Cooper Lake and later Xeons) and AMX (Sapphire Rapids).
X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686"})
ARM_MACHINES = frozenset({"aarch64", "arm64"})
MIXED_PRECISION_CHOICES = ("auto", "bf16", "no")


def cpuinfo_field(name: str) -> str | None:
    """The first processor's value of `name` in /proc/cpuinfo, or None (no such field, or not Linux)."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_name() -> str:
    """The CPU's model name, e.g. "AMD EPYC 9R14 96-Core Processor"."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_features() -> frozenset[str]:
    """The CPU's feature flags: Linux's `flags` (x86) or `Features` (arm64) line, or on macOS the arm64 features that
    sysctl reports as `hw.optional.arm.FEAT_*` (named like Linux's, e.g. `bf16`)."""
    listed = cpuinfo_field("flags") or cpuinfo_field("Features")
    if listed is not None:
        return frozenset(listed.split())
    if platform.system() == "Darwin":
        return darwin_arm_features()
    return frozenset()


def darwin_arm_features() -> frozenset[str]:
    try:
        output = subprocess.run(["sysctl", "hw.optional.arm"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    features = set()
    for line in output.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("hw.optional.arm.FEAT_") and value.strip() == "1":
            features.add(key.removeprefix("hw.optional.arm.FEAT_").lower())
    return frozenset(features)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` computes bf16 natively: CUDA devices that torch says support it, x86 CPUs with AVX512-BF16 or
    AMX, arm64 CPUs with the bf16 extension. Anything else emulates it, or has none."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    machine = platform.machine().lower()
    if machine in X86_MACHINES:
        return bool(X86_BF16_FLAGS & cpu_features())
    if machine in ARM_MACHINES:
        return "bf16" in cpu_features()
    return False


@dataclass(frozen=True)
class Precision:
    """The precision a run computes in ("bf16" autocast or "no": fp32) and why, for its start-up line."""

    mixed_precision: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.mixed_precision == "bf16" else torch.float32

    def describe(self) -> str:
        compute = "bf16 autocast, fp32 weights" if self.mixed_precision == "bf16" else "fp32"
        return f"{compute} ({self.reason})"


def bf16_support(device: torch.device) -> str:
    """What the device has, in words: why bf16 is native or emulated there."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} {'supports' if native_bf16(device) else 'lacks'} bf16"
    if device.type != "cpu":
        return f"{device.type} is not known to compute bf16 natively"
    machine = platform.machine().lower()
    if machine in X86_MACHINES:
        found = sorted(X86_BF16_FLAGS & cpu_features())
        return f"this CPU has {', '.join(found)}" if found else "this CPU has neither avx512_bf16 nor amx_bf16"
    if machine in ARM_MACHINES:
        return f"this CPU {'has' if native_bf16(device) else 'lacks'} the arm64 bf16 extension"
    return f"bf16 is emulated on {machine or 'this'} CPUs"


def choose_precision(requested: str, device: torch.device | str = "cpu") -> Precision:
    """The precision for `requested` ("auto", "bf16" or "no") on `device`: auto is bf16 where the device computes it
    natively and fp32 elsewhere. bf16 asked for on a device that emulates it is honoured, with a warning (once)."""
    if requested not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"mixed precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {requested!r}")
    device = torch.device(device)
    if requested == "no":
        return Precision("no", "asked for")
    native, support = native_bf16(device), bf16_support(device)
    if requested == "bf16":
        if not native:
            warn_emulated_bf16(support)
        return Precision("bf16", f"asked for; {support}" + ("" if native else ", so it is emulated and slow"))
    if native:
        return Precision("bf16", f"auto: {support}")
    return Precision("no", f"auto: {support}, so bf16 would be emulated and slow")


@cache
def warn_emulated_bf16(support: str) -> None:
    """Warn, once per process, that bf16 work on this device is emulated."""
    logger.warning(
        "bf16 on a device that emulates it (%s): every operand is converted to fp32 and back, which runs many times "
        "slower than fp32 (20x measured on an AVX2-only CPU). For speed use fp32: `--mixed-precision auto` or `no` "
        "in glade pretrain, `model.float()` before decoding.", support
    )


def computable_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """`dtype`, or fp32 where it is bf16 and `device` would emulate it: the dtype to run a model saved in `dtype`."""
    return torch.float32 if dtype == torch.bfloat16 and not native_bf16(device) else dtype
