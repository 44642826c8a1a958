"""Write files, pictures and directories so that readers (and a resumed run) never see half of one.

Everything is first written under a temporary name in the same directory, flushed to disk (fsync), then renamed
into place, and the rename is flushed too: a rename within one filesystem is atomic, so a crash or a power loss
leaves either the old result or the new one, never a mix or a complete-looking folder of unflushed data. A write that
fills the disk removes what it wrote and raises `NoSpaceLeftError`, one line naming the path.
"""

from __future__ import annotations

import errno
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


# Free bytes under which a failed write is taken to have filled the disk, whatever the writer said (numpy's tofile,
# which gguf writes with, reports only "N requested and M written").
FULL_DISK_BYTES = 1 << 20


class NoSpaceLeftError(OSError):
    """A write that ran out of disk space; the message names the path."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file()) if path.is_dir() else 0


def no_space_left(error: BaseException, target: Path, partial: Path) -> NoSpaceLeftError | None:
    """`error` as one line naming `target` if the write failed because the disk is full, else None; `partial` is
    what had been written (its size says how much more than that was needed)."""
    if not isinstance(error, Exception):  # an interrupt is not a full disk, whatever the free space
        return None
    causes, cause = [], error
    while cause is not None and len(causes) < 8:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    said = any(getattr(c, "errno", None) == errno.ENOSPC or "No space left on device" in str(c) for c in causes)
    # Writers' I/O failures: OSError (numpy, gguf, open), RuntimeError (torch.save), safetensors' own error type.
    io_failure = any(isinstance(c, (OSError, RuntimeError)) or type(c).__name__ == "SafetensorError" for c in causes)
    free = _free_bytes(target.parent)
    if not (said or (io_failure and free is not None and free < FULL_DISK_BYTES)):
        return None
    written = _tree_bytes(partial) / 1e6
    return NoSpaceLeftError(
        f"{target}: no space left on device (it needed more than the {written:.1f} MB written before the disk filled; "
        f"{(free or 0) / 1e6:.1f} MB free); nothing was left behind",
    )


@contextmanager
def removed_on_failure(target: Path, partial: Path) -> Iterator[None]:
    """Delete `partial` (a file or a staging folder for `target`) if the block fails; a full disk becomes
    `NoSpaceLeftError`."""
    try:
        yield
    except BaseException as error:
        full = no_space_left(error, target, partial)
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        if full is not None:
            raise full from error
        raise


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk (directories only where the OS can open them: POSIX)."""
    if path.is_dir() and os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: Path) -> None:
    """Flush every file and folder under `directory`, and `directory` itself, before it is renamed into place."""
    for path in sorted(directory.rglob("*"), key=lambda entry: len(entry.parts), reverse=True):
        fsync_path(path)
    fsync_path(directory)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer to fill; on success it becomes `path`, on error it is
    removed. For files too large to hold in memory (`write_bytes_atomically` takes the bytes at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    with removed_on_failure(path, Path(tmp)):
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be read by others
        fsync_path(Path(tmp))
        os.replace(tmp, path)
        fsync_path(path.parent)


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


def retired_copies(target: Path) -> list[Path]:
    """Older versions of `target` that `replace_directory` moved aside, newest first."""
    found = [folder / target.name for folder in target.parent.glob(f".{target.name}.old-*") if folder.is_dir()]
    return sorted((path for path in found if path.is_dir()), key=lambda path: path.stat().st_mtime, reverse=True)


def clean_interrupted_writes(target: Path) -> None:
    """Before writing `target` again, undo what a killed writer left: a replacement cut between its two renames (the
    old `target` moved aside, the new one not in place) gets the old one back; staging folders and moved-aside
    copies are deleted."""
    retired = retired_copies(target)
    if retired and not target.exists():
        os.replace(retired[0], target)
    for pattern in (f".{target.name}.old-*", f".{target.name}.*.tmp"):
        for folder in target.parent.glob(pattern):
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished directory `source` to `target`; an older `target` is replaced, or kept if the swap fails
    (or, after a crash between the two renames, put back by the next `clean_interrupted_writes`)."""
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
    clean_interrupted_writes(target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    with removed_on_failure(target, staging):
        yield staging
        os.chmod(staging, 0o755)
        # Some writers (safetensors through transformers' save) create 0600 files; a saved model is for everyone.
        for path in staging.rglob("*"):
            path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))
        fsync_tree(staging)
        replace_directory(staging, target)
        fsync_path(target.parent)


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
