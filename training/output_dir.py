"""A `glade pretrain` output directory: one run at a time trains in it, and a new run never starts over another's
checkpoints."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate import Accelerator

from .checkpointing import list_checkpoints
from .distributed import main_process_decides

logger = logging.getLogger("glade.pretrain")

FINAL_DIR = "final"
# The process id of the run holding the output directory's lock (see RunLock).
LOCK_FILE = ".lock"


@contextmanager
def one_run_per_output_dir(accelerator: Accelerator, output_dir: str) -> Iterator[None]:
    """Hold the output directory's RunLock for the run, or stop every rank if another run holds it. Only the main
    process locks; the other ranks learn its verdict and stop with it."""
    held: list[RunLock] = []  # the main process's lock
    main_process_decides(accelerator, lambda: held.append(RunLock(Path(output_dir))))
    try:
        yield
    finally:
        for lock in held:
            lock.close()


class RunLock:
    """An advisory lock (flock) on the output directory itself, held while the run trains there.

    Locking the directory rather than a file in it means deleting OUTPUT_DIR/.lock cannot release the lock. The
    lock belongs to the open descriptor, so it is released however the process ends: a killed run blocks nothing,
    and its `--resume` starts. OUTPUT_DIR/.lock only names the holder's process id, for a refused run's message."""

    def __init__(self, output_dir: Path):
        self.descriptor = os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            holder = (output_dir / LOCK_FILE).read_text().strip() if (output_dir / LOCK_FILE).is_file() else ""
            raise ValueError(
                f"output directory {output_dir} is in use by another glade pretrain run (process {holder or 'unknown'})"
                ": wait for it to finish, or stop it and continue with --resume latest, or choose another --output-dir"
            ) from None
        except OSError as error:  # a file system without locks (some network mounts): train unguarded, not at all
            logger.warning("cannot lock %s (%s): nothing stops a second run in this folder", output_dir,
                           error.strerror)
        (output_dir / LOCK_FILE).write_text(f"{os.getpid()}\n")

    def close(self) -> None:
        if self.descriptor >= 0:
            os.close(self.descriptor)
            self.descriptor = -1


def check_no_earlier_run(output_dir: str) -> None:
    existing = [path.name for _, path in list_checkpoints(output_dir)]
    if existing or (Path(output_dir) / FINAL_DIR).exists():
        raise ValueError(
            f"output directory {output_dir} already holds a training run "
            f"({', '.join(existing) or FINAL_DIR}): continue it with --resume latest or choose another --output-dir"
        )

