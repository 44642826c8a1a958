"""Imports run one way: glade.training and glade.conversion import the core (the `glade` package), never the
reverse, so the core loads alone and no import order can cycle."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import glade

CORE = Path(glade.__file__).parent
OUTER = ("glade.training", "glade.conversion")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function, as absolute names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "glade." * (node.level > 0) + (node.module or "")
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda path: path.name)
def test_no_core_module_imports_training_or_conversion(path):
    assert not {name for name in imported_modules(path) if name.startswith(OUTER)}


# The order that used to cycle (checkpoints -> tiny -> training.tokenizer -> training.data -> checkpoints), from
# either end.
@pytest.mark.slow
@pytest.mark.parametrize("first", ["glade.loading", "glade.training.tokenizer"])
def test_each_module_imports_first_in_a_fresh_interpreter(first):
    result = subprocess.run([sys.executable, "-c", f"import {first}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_glade_generate_does_not_load_training_or_conversion():
    code = (
        "import json, sys\n"
        "from glade.cli import main\n"
        "main(['generate', 'Hi', '--model', 'tiny-random', '--max-new-tokens', '2', '--greedy'])\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({OUTER!r}))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
