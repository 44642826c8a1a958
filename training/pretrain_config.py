"""What a `glade pretrain` run is told: `PretrainConfig`, whose fields are also the command's flags.

Each option is declared once, as a field: its name gives the flag (`warmup_steps` is `--warmup-steps`), its type
the flag's type, and its metadata the help text, the group it is listed under, its choices and the rule its value
must meet. `add_arguments` builds the command line from the fields, as transformers' `HfArgumentParser` does, plus
the argument groups and the one-of-three model choice it lacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any

# The size parser of huggingface_hub's split_torch_state_dict_into_shards, which save_pretrained shards with.
from huggingface_hub.serialization._base import parse_size_to_int
from huggingface_hub.utils import HFValidationError, validate_repo_id

from glade.hardware import MIXED_PRECISION_CHOICES

from .data import default_cache_dir
from .kernel_choice import CANDIDATES
from .optim import DEFAULT_MUON_LR, OPTIMIZERS, WEIGHT_DECAY_SCHEDULES, MuonOptions, check_muon_options

MODEL_SOURCES = ("preset", "config", "init_from")
# Rules a value must meet, as (test, description); each is written so that NaN fails it.
AT_LEAST_ONE = (lambda value: value is None or value >= 1, ">= 1")
NOT_NEGATIVE = (lambda value: value >= 0, ">= 0")
POSITIVE = (lambda value: value > 0, "> 0")
A_FRACTION = (lambda value: value is None or 0 <= value < 1, "in [0, 1)")


def option(
    group: str,
    help: str | None = None,
    default: Any = MISSING,
    *,
    rule: tuple[Callable[[Any], bool], str] | None = None,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
) -> Any:
    """A PretrainConfig field and its flag: the group it is listed under, its help, its default (none: the flag is
    required) and what its value must be."""
    metadata = {"group": group, "help": help, "rule": rule, "choices": choices, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


MODEL, DATA, TRAINING = "model (choose one)", "data", "training"
PROGRESS, EXPORT = "evaluation, logging and checkpoints", "export"


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Everything a run is told, one field per flag. Building it checks every value, so a bad one fails before any
    work; `min_lr` and `warmup_steps` are resolved here, and `block_size`, which needs the model, when the run
    starts. Paths may be given as `pathlib.Path`; they are kept as strings."""

    preset: str | None = option(MODEL, "a named architecture: glade-tiny, glade-small, gpt2, gpt3-small, ...", None)
    config: str | None = option(MODEL, "a JSON file of GladeConfig fields (a saved config.json works)", None)
    init_from: str | None = option(MODEL, "continue pre-training a saved causal LM (directory or Hub id)", None)
    dropout: float | None = option(MODEL, "override all dropout probabilities", None, rule=A_FRACTION)

    data: tuple[str, ...] = option(DATA, ".txt/.jsonl/.parquet files (globs ok), a dataset folder, or a Hub dataset id")
    tokenizer: str = option(DATA, "tokenizer directory (see `glade train-tokenizer`)")
    text_column: str = option(DATA, "column holding the documents", "text")
    data_split: str = option(DATA, "split of a Hub --data dataset", "train")
    data_config: str | None = option(DATA, "configuration name of a Hub dataset", None)
    val_data: tuple[str, ...] | None = option(DATA, "validation documents (default: --val-fraction)", None)
    val_split: str = option(DATA, "split of a Hub --val-data dataset", "validation")
    val_fraction: float = option(DATA, "last fraction of the tokens held out", 0.05)
    shuffle_documents: bool = option(DATA, "put the training documents (the spans between end-of-text tokens) in a new "
                                     "order each epoch, so each epoch cuts its blocks elsewhere", False)
    streaming: bool = option(DATA, "stream while tokenizing (corpora larger than memory)", False)
    cache_dir: str | None = option(DATA, f"token cache (default: {default_cache_dir()})", None)
    num_workers: int = option(DATA, "DataLoader worker processes", 0, rule=NOT_NEGATIVE)

    output_dir: str = option(TRAINING)
    max_steps: int = option(TRAINING, "optimizer steps", rule=AT_LEAST_ONE)
    batch_size: int = option(TRAINING, "blocks per micro-batch per process", 8, rule=AT_LEAST_ONE)
    block_size: int | None = option(TRAINING, "tokens per block (default: n_positions)", None, rule=AT_LEAST_ONE)
    grad_accum: int = option(TRAINING, "micro-batches per optimizer step", 1, rule=AT_LEAST_ONE)
    batch_ramp_steps: int = option(TRAINING, "over the first K steps the micro-batches per step grow linearly from 1 "
                                   "to --grad-accum (0: no ramp)", 0, rule=NOT_NEGATIVE)
    optimizer: str = option(TRAINING, "adamw, or muon: Muon for the weight matrices inside the transformer blocks "
                            "and AdamW for embeddings, output head, norms and biases", "adamw", choices=OPTIMIZERS)
    lr: float = option(TRAINING, "AdamW's peak learning rate", 6e-4, rule=POSITIVE)
    muon_lr: float = option(TRAINING, "Muon's peak learning rate, with --optimizer muon", DEFAULT_MUON_LR,
                            rule=POSITIVE)
    polar_express: bool = option(TRAINING, "Muon orthogonalises with Polar Express's five polynomials, one per step, "
                                 "instead of torch's one quintic", False)
    normuon: bool = option(TRAINING, "NorMuon: Muon scales each neuron's update by a running RMS of it (state that "
                           "checkpoints carry)", False)
    cautious_weight_decay: bool = option(TRAINING, "Muon decays a weight only where its update also moves it "
                                         "towards zero", False)
    min_lr: float | None = option(TRAINING, "AdamW's learning rate at the end (default: lr / 10); Muon's ends at the "
                                  "same fraction of --muon-lr", None)
    warmup_steps: int | None = option(TRAINING, "linear warmup (default: 5%% of max steps)", None, rule=NOT_NEGATIVE)
    weight_decay: float = option(TRAINING, "decoupled weight decay of the weight matrices, for AdamW and Muon alike: "
                                 "each step shrinks them by their lr x this", 0.1, rule=NOT_NEGATIVE)
    weight_decay_schedule: str = option(TRAINING, "constant, or linear: the weight decay falls linearly to zero at "
                                        "--max-steps (nanochat)", "constant", choices=WEIGHT_DECAY_SCHEDULES)
    beta1: float = option(TRAINING, "decay of the gradient's running mean (AdamW)", 0.9, rule=A_FRACTION)
    beta2: float = option(TRAINING, "decay of the squared gradient's running mean (AdamW)", 0.95,
                          rule=A_FRACTION)
    grad_clip: float = option(TRAINING, "max gradient norm (0: no clipping)", 1.0, rule=NOT_NEGATIVE)
    ema_decay: float = option(TRAINING, "validate and export an exponential moving average of the weights with this "
                              "decay per step, e.g. 0.999 (0: the trained weights)", 0.0, rule=A_FRACTION)
    mixed_precision: str = option(TRAINING, "bf16 autocast, or no (fp32); auto: bf16 where the device computes it "
                                  "natively (CUDA with bf16, x86 with avx512_bf16 or amx_bf16, arm64 with bf16), else "
                                  "fp32", "auto", choices=MIXED_PRECISION_CHOICES)
    gradient_checkpointing: bool = option(TRAINING, "recompute activations in backward", False)
    compile: bool = option(TRAINING, "torch.compile the model", False)
    compile_attention: str = option(TRAINING, "attention kernel of a compiled CPU run; auto times one block on this "
                                    "machine at the run's shape with each, and uncompiled, and takes the fastest "
                                    "(uncompiled: the run trains eager)", "auto", choices=("auto", *CANDIDATES))
    seed: int = option(TRAINING, "seed of the initial weights, the data order and dropout", 1337)

    eval_every: int = option(PROGRESS, "validate every K steps (0: only at the end)", 250, rule=NOT_NEGATIVE)
    eval_batches: int = option(PROGRESS, "validation batches per process", 20, rule=AT_LEAST_ONE)
    log_every: int = option(PROGRESS, "log training metrics every K steps", 10, rule=AT_LEAST_ONE)
    report_to: str = option(PROGRESS, "Accelerate tracker: tensorboard, wandb, all, none", "none")
    save_every: int = option(PROGRESS, "checkpoint every K steps (0: never)", 1000, rule=NOT_NEGATIVE)
    keep_last: int = option(PROGRESS, "checkpoints to keep (0: all)", 2, rule=NOT_NEGATIVE)
    resume: str | None = option(PROGRESS, "resume from a checkpoint", None, metavar="latest|PATH")
    resume_fallback: bool = option(PROGRESS, "if that checkpoint is damaged, resume from the newest complete one "
                                   "before it", False)
    record_samples: bool = option(PROGRESS, "debug: each process logs the blocks it trains on to "
                                  "OUTPUT_DIR/samples/", False)

    max_shard_size: str = option(EXPORT, "largest safetensors shard in final/", "2GB")
    push_to_hub: bool = option(EXPORT, "upload final/ to the Hub", False)
    hub_model_id: str | None = option(EXPORT, "ORG/NAME of the Hub repository", None)
    hub_private: bool = option(EXPORT, "create the Hub repository as private", False)

    @property
    def muon_options(self) -> MuonOptions:
        return MuonOptions(self.polar_express, self.normuon, self.cautious_weight_decay)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PretrainConfig:
        """The config of parsed command-line arguments (flags not given take the defaults above)."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls) if hasattr(args, field.name)})

    def __post_init__(self) -> None:
        # Frozen: these are the only assignments, while the config is being built.
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, field.name, os.fspath(value))
            elif isinstance(value, (list, tuple)):
                object.__setattr__(self, field.name, tuple(map(os.fspath, value)))
        if self.min_lr is None:
            object.__setattr__(self, "min_lr", self.lr / 10)
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", max(1, self.max_steps // 20))
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the flag of the first value that cannot work."""
        if sum(getattr(self, source) is not None for source in MODEL_SOURCES) != 1:
            raise ValueError("choose the model with exactly one of --preset, --config and --init-from")
        for field in fields(self):
            value, rule, choices = getattr(self, field.name), field.metadata["rule"], field.metadata["choices"]
            if choices is not None and value not in choices:
                raise ValueError(f"{flag_name(field)} must be one of {', '.join(choices)}, got {value}")
            if rule is not None and not rule[0](value):
                raise ValueError(f"{flag_name(field)} must be {rule[1]}, got {value}")
        check_muon_options(self.optimizer, self.muon_options)
        if self.batch_ramp_steps and self.grad_accum == 1:
            raise ValueError("--batch-ramp-steps ramps the micro-batches per step up to --grad-accum: it needs "
                             "--grad-accum 2 or more")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}")
        if parse_shard_size(self.max_shard_size) <= 0:
            raise ValueError(f"--max-shard-size must be positive, got {self.max_shard_size}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push-to-hub needs --hub-model-id ORG/NAME")
        if self.hub_model_id is not None:
            try:  # before training, not after it
                validate_repo_id(self.hub_model_id)
            except HFValidationError as error:
                raise ValueError(f"--hub-model-id {self.hub_model_id!r} is not a Hub repository id: {error}") from None


def parse_shard_size(size: str) -> int:
    """Bytes of a `--max-shard-size` such as 2GB or 500MB, parsed as the export will parse it."""
    try:
        return parse_size_to_int(size)
    except ValueError:
        raise ValueError(f"--max-shard-size must be a size such as 2GB, 500MB or 100KB, got {size!r}") from None


def flag_name(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per PretrainConfig field. A flag not given is left out of the parsed namespace (argparse.SUPPRESS),
    so the defaults live in one place: the fields."""
    groups: dict[str, argparse._ActionsContainer] = {}
    types_of = typing.get_type_hints(PretrainConfig)
    for field in fields(PretrainConfig):
        title = field.metadata["group"]
        if title not in groups:
            groups[title] = parser.add_argument_group(title, argument_default=argparse.SUPPRESS)
            if title == MODEL:
                groups[MODEL, "source"] = groups[title].add_mutually_exclusive_group(required=True)
        container = groups[MODEL, "source"] if field.name in MODEL_SOURCES else groups[title]
        container.add_argument(flag_name(field), **argparse_options(field, types_of[field.name]))


def argparse_options(field: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    """What `add_argument` needs to parse a field of this type: a switch for a bool, one or more values for a
    tuple, one value of the field's type otherwise."""
    help = field.metadata["help"]
    if field.default not in (MISSING, None, False) and help is not None and "default:" not in help:
        help += f" (default: {field.default})"
    options: dict[str, Any] = {"help": help}
    if annotation is bool:
        return options | {"action": "store_true"}
    alternatives = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    value_type = next(arg for arg in alternatives if arg is not types.NoneType)
    if typing.get_origin(value_type) is tuple:
        options |= {"nargs": "+"}
    elif value_type is not str:
        options |= {"type": value_type}
    if field.default is MISSING and field.name not in MODEL_SOURCES:
        options |= {"required": True}
    return options | {key: field.metadata[key] for key in ("choices", "metavar") if field.metadata[key] is not None}
