"""Print a pip constraints file that pins every dependency Glade declares (and the `dev` extra) to its lower bound.

    python .ci/lowest_constraints.py > lowest.txt && pip install -c lowest.txt ".[dev]"

A declared range is only true if its bottom works: CI installs these pins into a second environment and runs a subset
of the suite there. A dependency without a lower bound is an error, since its oldest release would be untested.
"""

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def lower_bounds(pyproject: Path, extras: tuple[str, ...] = ("dev",)) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = list(project["dependencies"])
    for extra in extras:
        declared += project["optional-dependencies"][extra]
    pins = []
    for line in declared:
        requirement = Requirement(line)
        lowest = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
        if not lowest:
            raise SystemExit(f"{pyproject}: {line!r} declares no lower bound")
        pins.append(f"{requirement.name}=={lowest[0]}")
    return pins


if __name__ == "__main__":
    print("\n".join(lower_bounds(PYPROJECT, tuple(sys.argv[1:]) or ("dev",))))
