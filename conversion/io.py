"""The file side of conversion: reading weight files and copying tokenizer files."""

import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from glade.loading import check_finite, read_json

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
# transformers 5 saves tokenizers as `TokenizersBackend`, a class transformers 4 cannot import; both load a
# tokenizer.json as `PreTrainedTokenizerFast`.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# PreTrainedTokenizerFast's default in transformers 4 adds token_type_ids, which GPT-2 would add to its embeddings.
CAUSAL_LM_INPUT_NAMES = ["input_ids", "attention_mask"]


def load_state_dict_files(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint folder: single-file or sharded, safetensors or pickled `.bin`; NaN or
    infinite weights are a ValueError naming them."""
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
        else:
            state_dict = load_weight_file(path)
        check_finite(directory, state_dict.items())
        return state_dict
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


def make_tokenizer_config_portable(directory: Path) -> None:
    """Rewrite the tokenizer_config.json beside a tokenizer.json so transformers 4.4x-4.57 and 5.x both load it.

    Only the class and the model inputs change; special tokens, model_max_length and the rest stay as they are.
    """
    path = Path(directory) / "tokenizer_config.json"
    if not (path.is_file() and (Path(directory) / "tokenizer.json").is_file()):
        return
    fields = read_json(path)
    fields.update(tokenizer_class=PORTABLE_TOKENIZER_CLASS, model_input_names=CAUSAL_LM_INPUT_NAMES)
    path.write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
