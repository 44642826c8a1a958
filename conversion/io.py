"""The file side of conversion: reading weight files and copying tokenizer files."""

import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from glade.checkpoints import read_json

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
