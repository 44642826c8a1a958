"""The file side of conversion: reading weight files, copying tokenizer files, and an all-or-nothing output folder."""

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

# In order of preference: a folder holding both formats is read from safetensors.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def load_state_dict_files(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint folder: single-file or sharded, safetensors or pickled `.bin`."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(read_json(path).get("weight_map", {}).values()))
            if not shards:
                raise ValueError(f"{path} has an empty or missing weight_map")
            state_dict = {}
            for shard in tqdm(shards, desc=f"Reading {directory.name}", unit="shard", disable=len(shards) < 2):
                state_dict.update(load_weight_file(directory / shard))
            return state_dict
        return load_weight_file(path)
    raise FileNotFoundError(f"No weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors or pickled weight file, with unreadable files reported by name."""
    if not path.is_file():
        raise FileNotFoundError(f"Weight file {path} not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error
    return load_torch_file(path)


def load_torch_file(path: Path) -> dict:
    """A pickled checkpoint, restricted to tensors and plain containers (no arbitrary code runs on load)."""
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from error


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy whichever tokenizer files `source` has, byte for byte; returns their names."""
    copied = [name for name in TOKENIZER_FILES if (Path(source) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(source) / name, Path(destination) / name)
    return copied


@contextmanager
def atomic_output_dir(destination: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `destination` only if the block finishes.

    The temporary folder sits beside `destination`, so the final step is a rename on the same file system; on any
    error it is removed and `destination` is left as it was.
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise FileExistsError(f"Destination {destination} exists and is not a directory")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Destination {destination} is not empty; pass --overwrite (overwrite=True) to replace it"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
        if destination.exists():
            _replace_dir(destination, staging)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(destination: Path, replacement: Path) -> None:
    """Swap `replacement` in for the existing `destination`, putting the old one back if the swap fails."""
    retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
    try:
        os.replace(destination, retired / destination.name)
        try:
            os.replace(replacement, destination)
        except OSError:
            os.replace(retired / destination.name, destination)
            raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)
