"""Write files, pictures and directories so that readers (and a resumed run) never see half of one.

Everything is first written under a temporary name in the same directory, then renamed into place: a rename
within one filesystem is atomic, so a crash leaves either the old result or the new one, never a mix.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for the annotation: importing matplotlib takes a while, and conversion never plots
    from matplotlib.figure import Figure


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer to fill; on success it becomes `path`, on error it is
    removed. For files too large to hold in memory (`write_bytes_atomically` takes the bytes at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomically(path: str | Path, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def save_figure(figure: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Render a matplotlib figure to a PNG file atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_bytes_atomically(path, buffer.getvalue())
    return Path(path)


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished directory `source` to `target`; an older `target` is replaced, or kept if the swap fails."""
    if not target.exists():
        os.replace(source, target)
        return
    # A directory cannot be renamed over a non-empty one: move the old one aside first, then delete it.
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    try:
        os.replace(target, retired / target.name)
        try:
            os.replace(source, target)
        except OSError:
            os.replace(retired / target.name, target)
            raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty staging directory beside `target`; on success it becomes `target`, on error it is removed.

    With `overwrite=False` a non-empty `target` is refused before anything is written.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Destination {target} exists and is not a directory")
    if not overwrite and target.is_dir() and any(target.iterdir()):
        raise FileExistsError(f"Destination {target} is not empty; pass --overwrite (overwrite=True) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield staging
        os.chmod(staging, 0o755)
        # Some writers (safetensors through transformers' save) create 0600 files; a saved model is for everyone.
        for path in staging.rglob("*"):
            path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_writable_directory(path: str | Path) -> Path:
    """Create `path` if needed and prove a file can be written there; raise OSError naming it otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise OSError(f"output directory {path} is not writable: {error.strerror or error}") from error
    return path
