"""A folder's manifest: every file's size and SHA-256, written last into a staged folder before it is renamed into
place. A folder with one is complete, and any file missing or changed since is detected before it is used. Training
checkpoints and pretraining's `final/` carry one; loading a model folder that has one checks it first."""

import hashlib
import json
from pathlib import Path
from typing import Any

from .atomic import write_text_atomically

MANIFEST = "COMPLETE"


class ManifestError(ValueError):
    """A folder whose manifest is unreadable, or whose files no longer match it; the message names both."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, **fields: Any) -> None:
    """Record every file under `directory` (with `fields`, say the step); written last, it marks the folder done."""
    files = sorted(path for path in directory.rglob("*") if path.is_file() and path.name != MANIFEST)
    manifest = {
        str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in files
    }
    write_text_atomically(directory / MANIFEST, json.dumps({**fields, "files": manifest}, indent=1))


def verify_manifest(directory: Path, what: str) -> dict[str, Any]:
    """The manifest of `directory` (a `what`, for messages), after checking every file it lists."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ManifestError(f"{what} {directory} is corrupt: its {MANIFEST} manifest is unreadable ({error})") from None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise ManifestError(f"{what} {directory} is corrupt: {name} is missing")
        if path.stat().st_size != expected["bytes"] or file_sha256(path) != expected["sha256"]:
            raise ManifestError(f"{what} {directory} is corrupt: {name} does not match its recorded checksum")
    return manifest
