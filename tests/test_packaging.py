import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_only_the_glade_name_is_installed(tmp_path):
    code = (
        "import importlib.util as u, glade, glade.conversion, glade.training;"
        "print([n for n in ('modeling', 'training', 'conversion', 'benchmarks', 'tests') if u.find_spec(n)])"
    )
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_glade_console_command_is_installed():
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "glade"]
    assert script.value == "glade.cli:main"
    executable = Path(sys.executable).parent / "glade"
    result = subprocess.run([str(executable), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "generate" in result.stdout


def test_conversion_does_not_load_matplotlib():
    code = "import sys, glade.conversion; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
