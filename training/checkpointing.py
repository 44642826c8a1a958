"""Training checkpoints that are either complete or ignored.

`OUTPUT_DIR/checkpoint-STEP/` holds `accelerator.save_state` (model, optimizer, scheduler, every rank's RNG
states, FSDP shards), `trainer_state.json` (step, tokens seen, what fixes the data position) and, written last,
`COMPLETE`: a manifest with every file's size and SHA-256. Everything is written into `.checkpoint-STEP.tmp/` and
renamed into place only after the marker, so a run killed while saving leaves no `checkpoint-STEP` at all, and a
damaged checkpoint is detected before it is loaded.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from glade.atomic import fsync_path, fsync_tree, removed_on_failure, replace_directory, write_text_atomically
from glade.manifest import MANIFEST, ManifestError, verify_manifest, write_manifest

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MARKER = MANIFEST
TRAINER_STATE = "trainer_state.json"
# Where a resume from an older checkpoint moves what the run it branches from saved after it.
ABANDONED_DIR = "abandoned"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names it and what is wrong."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def staging_dir(output_dir: str | Path, step: int) -> Path:
    # The same name on every rank, and not matched by CHECKPOINT_PATTERN while unfinished.
    return Path(output_dir) / f".checkpoint-{step}.tmp"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every `checkpoint-STEP` directory, oldest first, complete or not."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_marker(directory: Path, step: int) -> None:
    """Record every file of the finished checkpoint; the marker's presence means "complete"."""
    write_manifest(directory, step=step)


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's trainer state, after checking the marker and every file against it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not (directory / MARKER).is_file():
        raise CheckpointError(
            f"checkpoint {directory} is incomplete: it has no {MARKER} marker (the run was probably stopped while "
            "saving it)"
        )
    try:
        manifest = verify_manifest(directory, "checkpoint")
    except ManifestError as error:
        raise CheckpointError(str(error)) from None
    if TRAINER_STATE not in manifest["files"]:
        raise CheckpointError(f"checkpoint {directory} is corrupt: it records no {TRAINER_STATE}")
    return read_trainer_state(directory)


def not_a_checkpoint(path: Path) -> str:
    """Why `path`, which is not named checkpoint-STEP, cannot be resumed from, and what to pass instead."""
    if list_checkpoints(path):
        return f"{path} is an output directory, not a checkpoint: pass --resume latest with --output-dir {path}"
    if (path / "config.json").is_file():
        return f"{path} is an exported model, not a training checkpoint: start a new run from it with --init-from"
    return f"{path} is not a checkpoint-STEP directory (--resume takes latest or OUTPUT_DIR/checkpoint-STEP)"


def find_checkpoint(output_dir: str | Path, resume: str, fallback: bool = False) -> Path:
    """The checkpoint `--resume latest|PATH` names, verified; with `fallback`, the newest complete one at or
    before it when it is damaged."""
    if resume == "latest":
        candidates = [path for _, path in reversed(list_checkpoints(output_dir))]
        if not candidates:
            raise CheckpointError(f"--resume latest: {output_dir} has no checkpoint-STEP directories to resume from")
    else:
        requested = Path(resume)
        match = CHECKPOINT_PATTERN.match(requested.name)
        if not match:
            raise CheckpointError(f"--resume {resume}: {not_a_checkpoint(requested)}")
        older = [
            path for step, path in reversed(list_checkpoints(requested.parent)) if match and step < int(match.group(1))
        ]
        candidates = [requested, *older]
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as error:
            if not fallback:
                raise CheckpointError(
                    f"{error}. Pass --resume-fallback to resume from the newest complete checkpoint before it"
                ) from None
            logger.warning("skipping %s", error)
    raise CheckpointError(f"no complete checkpoint to resume from among {', '.join(map(str, candidates))}")


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, trainer_state: dict[str, Any], keep_last: int
) -> Path:
    """Save the full training state as `checkpoint-STEP`; called on every rank, written by each as needed."""
    staging, final = staging_dir(output_dir, step), checkpoint_dir(output_dir, step)
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)  # left by a run killed while saving this step
    accelerator.wait_for_everyone()
    with removed_on_failure(final, staging):
        accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every rank's shards and RNG states must be on disk before the marker
    if accelerator.is_main_process:
        with removed_on_failure(final, staging):
            write_text_atomically(staging / TRAINER_STATE, json.dumps(trainer_state, indent=2))
            write_marker(staging, step)
            fsync_tree(staging)
            replace_directory(staging, final)
            fsync_path(final.parent)
        prune_checkpoints(output_dir, keep_last)
    return final


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / TRAINER_STATE).read_text())


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path)


def set_aside_later_saves(output_dir: str | Path, step: int, final_dir: str) -> Path | None:
    """Move what `output_dir` holds from after `step` (checkpoints, and `final_dir` if its manifest says it is
    later) to `output_dir/abandoned/`, so that `--resume latest` follows the run resumed at `step`; returns the
    folder they went to, or None when there were none."""
    output_dir = Path(output_dir)
    later = [path for saved, path in list_checkpoints(output_dir) if saved > step]
    final = output_dir / final_dir
    if saved_step(final) > step:
        later.append(final)
    if not later:
        return None
    (output_dir / ABANDONED_DIR).mkdir(exist_ok=True)
    destination = Path(tempfile.mkdtemp(dir=output_dir / ABANDONED_DIR, prefix=f"{time.strftime('%Y%m%d-%H%M%S')}"
                                        f"-after-step-{step}-"))
    for path in later:
        path.rename(destination / path.name)
    fsync_path(output_dir)
    return destination


def saved_step(folder: Path) -> int:
    """The step a folder's manifest records, or -1 when it records none (or there is no readable manifest)."""
    try:
        return int(json.loads((folder / MANIFEST).read_text()).get("step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        return -1


def remove_stale_staging(output_dir: str | Path) -> None:
    """Delete `.checkpoint-STEP.tmp` directories left by runs killed while saving."""
    for path in Path(output_dir).glob(".checkpoint-*.tmp"):
        logger.warning("removing unfinished checkpoint %s", path)
        shutil.rmtree(path)
