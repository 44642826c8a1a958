"""The remote code a shipped checkpoint carries is glade's own modeling code, byte for byte.

transformers runs these copies for users without glade (`trust_remote_code=True`), so a fix made in modeling/ and
not copied would reach only half the users; the numerical tests of the shipped model would not notice a change that
leaves its outputs alone.
"""

import ast
import json
from importlib.resources import files
from pathlib import Path

import pytest

import glade

MODELING = Path(glade.__file__).parent
SHIPPED = sorted(
    Path(str(entry)) for entry in files("glade.model_cards").iterdir() if entry.joinpath("config.json").is_file()
)


def remote_code_files(checkpoint: Path) -> set[str]:
    """The modules the checkpoint's auto_map names, and every module they import relatively (transformers copies
    those too), as file names."""
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    references = [ref for refs in auto_map.values() for ref in (refs if isinstance(refs, list) else [refs]) if ref]
    pending = {f"{ref.split('.')[0]}.py" for ref in references}
    found: set[str] = set()
    while pending:
        name = pending.pop()
        found.add(name)
        for node in ast.walk(ast.parse((MODELING / name).read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                modules = [node.module] if node.module else [alias.name for alias in node.names]
                pending |= {f"{module}.py" for module in modules} - found
    return found


def test_remote_code_files_names_what_the_auto_classes_import():
    assert remote_code_files(SHIPPED[-1]) == set(glade.REMOTE_CODE_FILES)


@pytest.mark.parametrize("checkpoint", SHIPPED, ids=[path.name for path in SHIPPED])
def test_shipped_remote_code_equals_the_modeling_package(checkpoint):
    differing = [
        name for name in sorted(remote_code_files(checkpoint))
        if not (checkpoint / name).is_file() or (checkpoint / name).read_bytes() != (MODELING / name).read_bytes()
    ]
    assert not differing, f"{checkpoint.name} ships stale or missing copies of modeling/: {', '.join(differing)}"
