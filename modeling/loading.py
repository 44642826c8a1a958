"""Loading a checkpoint: which one a name means, reading its config, and loading it strictly.

A checkpoint is named by a local directory, a Hub id (`name` or `owner/name`), or `tiny-random`, a tiny random Glade
model that needs no files. A name that can only be a local path (absolute, `./...`, `~/...`, or with more than one
`/`) is never looked up on the Hub, so a mistyped directory is reported as missing, not as a malformed Hub id.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import fields
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .configuration_glade import GladeConfig
from .manifest import MANIFEST, verify_manifest
from .param_count import count_parameters
from .tiny import byte_level_tokenizer, tiny_config, tiny_model

TINY_RANDOM = "tiny-random"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# A config whose model would need this many times the saved parameters is refused before the model is built.
OVERSIZED_CONFIG_FACTOR = 2
# Pretrained checkpoints ship as package data in model_cards/ (glade.model_cards); the newest is the default.
SHIPPED_MODEL_PATTERN = "glade-*"
# torch.compile's wrapper holds the model as `_orig_mod`, so a state dict taken through it carries this prefix.
COMPILED_PREFIX = "_orig_mod."


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only be a local path: Hub ids are `name` or `owner/name`."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def local_directory(name: str | Path) -> Path | None:
    """The local directory `name` names, or None when it can only be a Hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{name} is a file; expected a model directory or a Hub id")
    if looks_like_local_path(str(name)):
        raise FileNotFoundError(f"model directory {name} does not exist")
    return None


def resolve_checkpoint(name: str | Path) -> str:
    """`name` as `from_pretrained` should get it: a local directory holding a config.json, or a Hub id."""
    directory = local_directory(name)
    if directory is None:
        return str(name)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{name} is not a model directory: it has no {CONFIG_NAME}")
    return str(directory)


def default_model() -> str:
    """The newest shipped pretrained checkpoint, or `tiny-random` when none ships."""
    shipped = sorted(
        Path(str(entry)) for entry in files("glade.model_cards").iterdir()
        if fnmatch(entry.name, SHIPPED_MODEL_PATTERN) and entry.joinpath(CONFIG_NAME).is_file()
    )
    return str(shipped[-1]) if shipped else TINY_RANDOM


def add_model_argument(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--model", default=None, help=f"checkpoint dir or hub id (default: shipped model, else {TINY_RANDOM})"
    )


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def require_model_type(found: str | None, expected: str, source: str | Path) -> None:
    if found == expected:
        return
    hint = "; convert it with `glade convert gpt2` first" if (found, expected) == ("gpt2", "glade") else ""
    raise ValueError(f"{source} is not a {expected} config (model_type={found!r}, expected {expected!r}){hint}")


def read_config_file(path: str | Path, **overrides: Any) -> GladeConfig:
    """A GladeConfig from a JSON file of its fields, with `overrides` applied.

    A saved config.json works: its bookkeeping keys (model_type, auto_map, architectures, ...) are accepted. Another
    model_type, or a key GladeConfig does not know (a misspelt field), is a ValueError naming it.
    """
    values = read_json(Path(path).expanduser())
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of GladeConfig fields")
    require_model_type(values.get("model_type", GladeConfig.model_type), GladeConfig.model_type, path)
    known = {field.name for field in fields(GladeConfig)} | set(GladeConfig.attribute_map)
    known |= set(GladeConfig().to_dict()) | {"auto_map", "rope_parameters"}  # only rotary configs have the last
    if unknown := sorted(set(values) - known):
        raise ValueError(f"{path} has unknown GladeConfig field(s): {', '.join(unknown)}")
    return GladeConfig.from_dict({**values, **overrides})


def read_checkpoint_config(name: str, **overrides: Any) -> PreTrainedConfig:
    """The config of any transformers checkpoint (directory or Hub id), read without loading weights. A config that
    needs the checkpoint's own code is refused, never run nor asked about (Glade's classes are registered locally)."""
    return AutoConfig.from_pretrained(resolve_checkpoint(name), trust_remote_code=False, **overrides)


def read_glade_config(name: str) -> GladeConfig:
    """The config of a Glade checkpoint (directory, Hub id or `tiny-random`); another model_type is a ValueError."""
    if name == TINY_RANDOM:
        return tiny_config()
    config = read_checkpoint_config(name)
    require_model_type(config.model_type, GladeConfig.model_type, name)
    return config


def check_tensors(
    source: str,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    wrong_shapes: Iterable[tuple[str, Sequence[int], Sequence[int]]] = (),
) -> None:
    """Raise a ValueError listing every missing, unexpected and wrongly shaped (saved, needed) tensor, if any."""
    problems = []
    if missing := sorted(missing):
        problems.append(f"missing {', '.join(missing)}")
    if unexpected := sorted(unexpected):
        problems.append(f"unexpected {', '.join(unexpected)}")
    problems += [
        f"{key} has shape {list(saved)}, the config needs {list(needed)}"
        for key, saved, needed in sorted(wrong_shapes, key=lambda entry: entry[0])
    ]
    if problems:
        raise ValueError(f"{source} does not match its config: " + "; ".join(problems))


def check_finite(source: str | Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse weights holding NaN or infinity (a diverged run, a damaged file): they decode to nothing and export as
    garbage. Tensors on the meta device hold no values and pass."""
    broken = [
        name for name, tensor in tensors
        if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all())
    ]
    if broken:
        shown = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        raise ValueError(
            f"{source} holds NaN or infinite weights in {shown}: the checkpoint is damaged or its training diverged"
        )


def safetensors_files(directory: Path) -> list[str]:
    """The safetensors files a folder's weights are saved in: the shards its index names, or model.safetensors."""
    if (directory / WEIGHTS_INDEX_NAME).is_file():
        return sorted(set(read_json(directory / WEIGHTS_INDEX_NAME)["weight_map"].values()))
    return [WEIGHTS_NAME]


def saved_parameter_count(directory: Path) -> int | None:
    """How many numbers a folder's safetensors weights hold, read from the file headers alone (None without
    safetensors weights)."""
    shards = safetensors_files(directory)
    if not all((directory / shard).is_file() for shard in shards):
        return None
    total = 0
    for shard in shards:
        with safe_open(directory / shard, framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    return total


def check_config_fits_weights(directory: Path, config: PreTrainedConfig) -> None:
    """Refuse a Glade config whose model is far larger than the saved weights, before that model is built: a config
    edited to n_layer=100000 would otherwise take minutes and gigabytes to build before a tensor is compared. Smaller
    mismatches are left to the strict load, which names each tensor."""
    if not isinstance(config, GladeConfig):
        return
    saved = saved_parameter_count(directory)
    needed = count_parameters(config).total
    if saved is not None and needed > OVERSIZED_CONFIG_FACTOR * saved:
        raise ValueError(
            f"{directory / CONFIG_NAME} describes a model of {needed:,} parameters (n_layer={config.n_layer}, "
            f"n_embd={config.n_embd}, vocab_size={config.vocab_size}) but its weights hold {saved:,}: the config "
            "does not belong to these weights"
        )


def load_causal_lm(name: str, **kwargs: Any) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained`, strictly.

    transformers fills a missing tensor with random values and drops an unexpected one, with only a warning; here
    either, or a tensor whose shape disagrees with the config, is a ValueError naming them, as are NaN or infinite
    weights. A folder with a manifest (pretraining's `final/`) is checked against it first.
    """
    checkpoint = resolve_checkpoint(name)
    if (Path(checkpoint) / MANIFEST).is_file():
        verify_manifest(Path(checkpoint), "model")
    if Path(checkpoint).is_dir():
        check_config_fits_weights(Path(checkpoint), kwargs.get("config") or read_checkpoint_config(checkpoint))
    # Glade's classes are registered locally; anything else must not run a checkpoint's code, nor ask whether to.
    model, loading = AutoModelForCausalLM.from_pretrained(
        checkpoint, output_loading_info=True, ignore_mismatched_sizes=True, trust_remote_code=False, **kwargs
    )
    check_tensors(name, loading["missing_keys"], loading["unexpected_keys"], loading["mismatched_keys"])
    check_finite(name, model.state_dict().items())
    return model


def check_weights(name: str, config: PreTrainedConfig | None = None) -> None:
    """Refuse what `load_causal_lm` would refuse, without reading a tensor (the model is built on the meta device)."""
    # transformers >= 5.25 kernelizes every load by default, and kernelize refuses the meta device; a check that
    # never runs the model has no use for kernels.
    load_causal_lm(name, config=config, device_map="meta", use_kernels=False)


def load_model_and_tokenizer(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM (loaded strictly) and tokenizer of a checkpoint directory, a Hub id, or `tiny-random`."""
    if name == TINY_RANDOM:
        return tiny_model(), byte_level_tokenizer()
    return load_causal_lm(name), load_tokenizer_files(name)


# Files a saved tokenizer is read from: a checkpoint folder holds at least one.
TOKENIZER_SOURCES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer_files(name: str | Path) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` of a folder or Hub id; a folder without tokenizer files, or with files that do
    not parse, is one error naming the folder (transformers would suggest installing sentencepiece)."""
    directory = local_directory(name)
    if directory is not None and not any((directory / source).is_file() for source in TOKENIZER_SOURCES):
        raise FileNotFoundError(
            f"{directory} has no tokenizer files (none of {', '.join(TOKENIZER_SOURCES)}): save the tokenizer "
            "beside the model (tokenizer.save_pretrained)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(directory or name), trust_remote_code=False)
    except OSError:
        raise
    except Exception as error:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise ValueError(f"the tokenizer in {directory or name} could not be read: {error}") from error
