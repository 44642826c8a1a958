"""The machine something ran on, as benchmark reports and model cards state it."""

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


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
