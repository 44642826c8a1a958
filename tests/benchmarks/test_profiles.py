"""`benchmarks/profiles.py --quick`: both profiles run, and each splits a step's time into parts that add up."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from glade.hardware import native_bf16

pytestmark = pytest.mark.slow

PROFILES = Path(__file__).resolve().parents[2] / "benchmarks" / "profiles.py"


def test_quick_profiles_split_each_step_against_its_floor():
    result = subprocess.run([sys.executable, str(PROFILES), "--quick"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"decoding, float32: [\d.]+ MB of weights per token; streaming them: [\d.]+ ms \(the floor", out)
    # bf16 only where the CPU computes it natively, as glade pretrain's default: decoding in it, and training under it.
    native = native_bf16("cpu")
    assert ("decoding, bfloat16:" in out) is native
    assert f"training step, {'bf16 autocast' if native else 'fp32'}, " in out
    assert "compiled attention: " in out
    lines = [line for line in out.splitlines() if re.match(r"  (GPT-2|Glade)", line)]
    assert len(lines) == 2 * (3 if native else 2)  # GPT-2 and Glade, for each decoding dtype and for training
    for line in lines:
        total = float(re.search(r": ([\d.]+) ms = ", line).group(1))
        parts = [float(ms) for ms in re.findall(r"(?:,|=) [a-zA-Z'.() ]+? ([\d.]+)(?=,| \()", line)]
        assert parts and abs(sum(parts) - total) <= 0.02 * total + 0.02, line
        assert re.search(r"\([\d.]+x the floor\)$", line)
