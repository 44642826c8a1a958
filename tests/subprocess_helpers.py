"""Run Python in a fresh interpreter where `glade` cannot be imported: the view of a user without the package."""

import json
import os
import subprocess
import sys
import textwrap

import torch

# A meta-path finder that refuses `glade`, placed before the editable-install finder; the repo folders are
# kept off sys.path too (-I), so only remote code or plain transformers can serve the model.
_BLOCK_GLADE = textwrap.dedent(
    """
    import sys
    class _NoGlade:
        def find_spec(self, name, path=None, target=None):
            if name == "glade" or name.startswith("glade."):
                raise ImportError("glade is blocked in this interpreter")
    sys.meta_path.insert(0, _NoGlade())
    """
)


def run_without_glade(
    code: str, cwd: str, env: dict[str, str] | None = None, timeout: int = 300, python: str = sys.executable
) -> str:
    """Run `code` with glade unimportable (in `python`, another environment's interpreter if given); returns stdout,
    raising with stderr on failure."""
    # The same thread count as this process: fp32 matmuls round differently with a different split of the work.
    threads = str(torch.get_num_threads())
    full_env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "OMP_NUM_THREADS": threads}
    full_env.update(env or {})
    result = subprocess.run(
        [python, "-I", "-c", _BLOCK_GLADE + textwrap.dedent(code)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def last_json_line(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])
