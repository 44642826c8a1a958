"""`glade pretrain`: pre-train (or continue pre-training) a Glade model with Accelerate.

Runs as a plain process (`glade pretrain ...`, `python -m glade.training.pretrain ...`) or under
`accelerate launch` for DDP / FSDP / DeepSpeed; from Python, `pretrain(PretrainConfig(...))`. The loop is
nanoGPT's: fetch a step's micro-batches, forward and backward each, clip, step; evaluate, log and checkpoint every
so often; export `final/` at the end.

Every rank runs the same steps and the same collectives; only the main process writes logs, checkpoint markers
and the export (sharded checkpoints are written by every rank through `accelerator.save_state`).
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from accelerate import Accelerator
from accelerate.utils import DistributedType, DynamoBackend, TorchDynamoPlugin, broadcast_object_list, set_seed
# The size parser of huggingface_hub's split_torch_state_dict_into_shards, which save_pretrained shards with.
from huggingface_hub.serialization._base import parse_size_to_int
from huggingface_hub.utils import HFValidationError, validate_repo_id
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedConfig

from glade import GladeConfig, GladeForCausalLM, GladePreTrainedModel  # registers glade with the Auto classes
from glade.hardware import MIXED_PRECISION_CHOICES, choose_precision, cpu_name
from glade.kernel_choice import CANDIDATES, UNCOMPILED, choose_kernel

from glade.atomic import atomic_directory, check_writable_directory
from glade.manifest import write_manifest
from glade.checkpoints import COMPILED_PREFIX, check_weights, read_checkpoint_config, read_config_file
from . import distributed
from .checkpoint import (
    TRAINER_STATE,
    CheckpointError,
    find_checkpoint,
    list_checkpoints,
    read_trainer_state,
    remove_stale_staging,
    save_checkpoint,
    set_aside_later_saves,
)
from .data import (
    IGNORE_INDEX,
    StepBatchSampler,
    TextSource,
    TokenBlocks,
    default_cache_dir,
    eval_batches,
    make_loader,
    model_inputs,
    resolve_source,
    split_train_val,
    tokenize_to_cache,
)
from .metrics import METRICS_FILENAME, MetricsLog
from .model_card import LOSS_CURVE, write_model_card
from .optim import (
    DEFAULT_MUON_LR,
    OPTIMIZERS,
    check_optimizer_fits,
    command_line_hyperparameters,
    make_optimizer,
    make_scheduler,
    restore_hyperparameters,
)
from .plots import plot_loss_curve
from .tokenizer import load_tokenizer, token_byte_lengths

logger = logging.getLogger("glade.pretrain")

FINAL_DIR = "final"
# The process id of the run holding the output directory's lock (see RunLock).
LOCK_FILE = ".lock"
# Sampling defaults shipped in final/generation_config.json, so `pipeline("text-generation")` samples sensibly. Not a
# length (it would override a caller's max_length) nor a repetition penalty (greedy would no longer be greedy).
GENERATION_DEFAULTS = dict(do_sample=True, temperature=0.8, top_k=50)
# The hyperparameters a model card lists (plus muon_lr under --optimizer muon).
CARD_FIELDS = ("max_steps", "batch_size", "grad_accum", "block_size", "lr", "min_lr", "warmup_steps", "weight_decay",
               "grad_clip", "mixed_precision", "seed", "optimizer")

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """`python -m glade.training.pretrain` (and `accelerate launch -m glade.training.pretrain`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as error:
        parser.exit(2, f"glade pretrain: error: {error}\n")
    return 0


def run(args: argparse.Namespace) -> None:
    """The command-line entry: `glade pretrain` and `python -m glade.training.pretrain`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pretrain(PretrainConfig.from_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glade pretrain", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `glade pretrain`, one per PretrainConfig field. A flag not given is left out of the parsed
    namespace (argparse.SUPPRESS), so the defaults live in one place: PretrainConfig."""

    def group(title: str) -> argparse._ArgumentGroup:
        return parser.add_argument_group(title, argument_default=argparse.SUPPRESS)

    model = group("model (choose one)")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a named architecture: glade-tiny, glade-small, gpt2, gpt3-small, ...")
    source.add_argument("--config", help="a JSON file of GladeConfig fields (a saved config.json works)")
    source.add_argument("--init-from", help="continue pre-training a saved causal LM (directory or Hub id)")
    model.add_argument("--dropout", type=float, help="override all dropout probabilities")

    data = group("data")
    data.add_argument("--data", nargs="+", required=True,
                      help=".txt/.jsonl/.parquet files (globs ok), a dataset folder, or a Hub dataset id")
    data.add_argument("--tokenizer", required=True, help="tokenizer directory (see `glade train-tokenizer`)")
    data.add_argument("--text-column", help="column holding the documents (default: text)")
    data.add_argument("--data-split", help="split of a Hub --data dataset (default: train)")
    data.add_argument("--data-config", help="configuration name of a Hub dataset")
    data.add_argument("--val-data", nargs="+", help="validation documents (default: --val-fraction)")
    data.add_argument("--val-split", help="split of a Hub --val-data dataset")
    data.add_argument("--val-fraction", type=float, help="last fraction of the tokens held out")
    data.add_argument("--streaming", action="store_true", help="stream while tokenizing (corpora larger than memory)")
    data.add_argument("--cache-dir", help=f"token cache (default: {default_cache_dir()})")
    data.add_argument("--num-workers", type=int, help="DataLoader worker processes")

    train = group("training")
    train.add_argument("--output-dir", required=True)
    train.add_argument("--max-steps", type=int, required=True, help="optimizer steps")
    train.add_argument("--batch-size", type=int, help="blocks per micro-batch per process")
    train.add_argument("--block-size", type=int, help="tokens per block (default: n_positions)")
    train.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    train.add_argument("--optimizer", choices=OPTIMIZERS,
                       help="adamw, or muon: Muon for the weight matrices inside the transformer blocks and AdamW "
                            "for embeddings, output head, norms and biases (default: adamw)")
    train.add_argument("--lr", type=float, help="AdamW's peak learning rate")
    train.add_argument("--muon-lr", type=float,
                       help=f"Muon's peak learning rate, with --optimizer muon (default: {DEFAULT_MUON_LR})")
    train.add_argument("--min-lr", type=float,
                       help="AdamW's learning rate at the end (default: lr / 10); Muon's ends at the same fraction "
                            "of --muon-lr")
    train.add_argument("--warmup-steps", type=int, help="linear warmup (default: 5%% of max steps)")
    train.add_argument("--weight-decay", type=float,
                       help="decoupled weight decay of the weight matrices, for AdamW and Muon alike: each step "
                            "shrinks them by their lr x this (default: 0.1)")
    train.add_argument("--beta1", type=float)
    train.add_argument("--beta2", type=float)
    train.add_argument("--grad-clip", type=float, help="max gradient norm (0: no clipping)")
    train.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES,
                       help="bf16 autocast, or no (fp32); auto (default): bf16 where the device computes it natively "
                            "(CUDA with bf16, x86 with avx512_bf16 or amx_bf16, arm64 with bf16), else fp32")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument("--compile-attention", choices=["auto", *CANDIDATES],
                       help="attention kernel of a compiled CPU run; auto (default) times one block on this machine "
                            "at the run's shape with each, and uncompiled, and takes the fastest (uncompiled: the "
                            "run trains eager)")
    train.add_argument("--seed", type=int)

    progress = group("evaluation, logging and checkpoints")
    progress.add_argument("--eval-every", type=int, help="validate every K steps (0: only at the end)")
    progress.add_argument("--eval-batches", type=int, help="validation batches per process")
    progress.add_argument("--log-every", type=int, help="log training metrics every K steps")
    progress.add_argument("--report-to", help="Accelerate tracker: tensorboard, wandb, all, none")
    progress.add_argument("--save-every", type=int, help="checkpoint every K steps (0: never)")
    progress.add_argument("--keep-last", type=int, help="checkpoints to keep (0: all)")
    progress.add_argument("--resume", metavar="latest|PATH", help="resume from a checkpoint")
    progress.add_argument("--resume-fallback", action="store_true",
                          help="if that checkpoint is damaged, resume from the newest complete one before it")
    progress.add_argument("--record-samples", action="store_true",
                          help="debug: each process logs the blocks it trains on to OUTPUT_DIR/samples/")

    export = group("export")
    export.add_argument("--max-shard-size", help="largest safetensors shard in final/")
    export.add_argument("--push-to-hub", action="store_true", help="upload final/ to the Hub")
    export.add_argument("--hub-model-id", help="ORG/NAME of the Hub repository")
    export.add_argument("--hub-private", action="store_true", help="create the Hub repository as private")


# ----------------------------------------------------------------------------------------------------------------
# The configuration of a run


# What each checked field must be, as (test, description); the tests are written so that NaN fails them.
VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every"),
                    (lambda value: value >= 1, ">= 1")),
    "block_size": (lambda value: value is None or value >= 1, ">= 1"),
    **dict.fromkeys(("eval_every", "save_every", "keep_last", "num_workers", "warmup_steps", "weight_decay",
                     "grad_clip"), (lambda value: value >= 0, ">= 0")),
    **dict.fromkeys(("lr", "muon_lr"), (lambda value: value > 0, "> 0")),
    **dict.fromkeys(("beta1", "beta2"), (lambda value: 0 <= value < 1, "in [0, 1)")),
    "dropout": (lambda value: value is None or 0 <= value < 1, "in [0, 1)"),
    "optimizer": (lambda value: value in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    "mixed_precision": (lambda value: value in MIXED_PRECISION_CHOICES, f"one of {', '.join(MIXED_PRECISION_CHOICES)}"),
    "compile_attention": (lambda value: value in ("auto", *CANDIDATES), f"one of auto, {', '.join(CANDIDATES)}"),
}
PATH_FIELDS = ("config", "init_from", "tokenizer", "output_dir", "cache_dir", "resume")


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Everything a run is told: one field per `glade pretrain` flag, with the flag's name (`--warmup-steps` is
    `warmup_steps`) and default. Building it checks every value, so a bad one fails before any work; `min_lr` and
    `warmup_steps` are resolved here, and `block_size`, which needs the model, by `fit_block_size`. Paths may be
    given as `pathlib.Path`; they are kept as strings."""

    # The model: exactly one of a preset name, a GladeConfig JSON file or a saved model to continue.
    preset: str | None = None
    config: str | None = None
    init_from: str | None = None
    dropout: float | None = None

    data: tuple[str, ...]
    tokenizer: str
    text_column: str = "text"
    data_split: str = "train"
    data_config: str | None = None
    val_data: tuple[str, ...] | None = None
    val_split: str = "validation"
    val_fraction: float = 0.05
    streaming: bool = False
    cache_dir: str | None = None
    num_workers: int = 0

    output_dir: str
    max_steps: int
    batch_size: int = 8
    block_size: int | None = None
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 6e-4
    muon_lr: float = DEFAULT_MUON_LR
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    compile_attention: str = "auto"
    seed: int = 1337

    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    report_to: str = "none"
    save_every: int = 1000
    keep_last: int = 2
    resume: str | None = None
    resume_fallback: bool = False
    record_samples: bool = False

    max_shard_size: str = "2GB"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PretrainConfig:
        """The config of parsed command-line arguments (flags not given take the defaults above)."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls) if hasattr(args, field.name)})

    def __post_init__(self) -> None:
        # Frozen: these are the only assignments, while the config is being built.
        for name in PATH_FIELDS:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        object.__setattr__(self, "data", tuple(map(os.fspath, self.data)))
        if self.val_data is not None:
            object.__setattr__(self, "val_data", tuple(map(os.fspath, self.val_data)))
        if self.min_lr is None:
            object.__setattr__(self, "min_lr", self.lr / 10)
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", max(1, self.max_steps // 20))
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the flag of the first value that cannot work."""
        if sum(source is not None for source in (self.preset, self.config, self.init_from)) != 1:
            raise ValueError("choose the model with exactly one of --preset, --config and --init-from")
        for name, (valid, requirement) in VALUE_RULES.items():
            if not valid(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be {requirement}, got {getattr(self, name)}")
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


# ----------------------------------------------------------------------------------------------------------------
# The run


def pretrain(config: PretrainConfig) -> Path:
    """Train as `config` says and return the `final/` directory."""
    sources = resolve_sources(config)  # missing or empty files fail here, before any heavy work
    tokenizer = load_tokenizer(config.tokenizer)
    model_config = build_model_config(config, tokenizer)
    config = fit_block_size(config, model_config)
    check_writable_directory(config.output_dir)

    accelerator = make_accelerator(config)
    config = replace(config, mixed_precision=accelerator.mixed_precision)  # auto resolved, as the card states it
    with one_run_per_output_dir(accelerator, config.output_dir):
        if config.resume is None:
            check_no_earlier_run(config.output_dir)
        check_launch(config, accelerator)
        data = prepare_data(config, sources, tokenizer, accelerator)
        model, optimizer, scheduler = prepare_training(config, model_config, accelerator)
        state = TrainerState.start(config, accelerator.num_processes, data.train_key, model_config)
        if config.resume:
            state = resume(accelerator, config, state, optimizer, scheduler)
        if accelerator.is_main_process:
            remove_stale_staging(config.output_dir)
        if config.report_to != "none":
            accelerator.init_trackers("glade-pretrain", config=tracker_config(config))
        metrics = MetricsLog(config.output_dir, accelerator, resume_step=state.step if config.resume else None)

        train_loop(accelerator, model, optimizer, scheduler, data, tokenizer, state, metrics, config)
        check_finite_weights(model, accelerator, state.step)
        final = export_final(accelerator, model, tokenizer, config, metrics, sources[0])
        if config.push_to_hub and accelerator.is_main_process:
            push(final, config)
        # Free the DDP/FSDP wrappers while the process group is still alive. If DDP's reducer held the last
        # reference to the gloo process group, its destructor would wait for gloo's worker threads with the GIL
        # held while one of them needs the GIL to release a tensor: a hang at exit (pytorch/pytorch#56297).
        # destroy_process_group, in end_training, releases the GIL first.
        del model, optimizer, scheduler
        accelerator.free_memory()
        gc.collect()
        accelerator.end_training()
    return final


def resolve_sources(config: PretrainConfig) -> tuple[TextSource, TextSource | None]:
    train = resolve_source(config.data, config.text_column, config.data_split, config.data_config)
    if config.val_data is None:
        return train, None
    return train, resolve_source(config.val_data, config.text_column, config.val_split, config.data_config)


def build_model_config(config: PretrainConfig, tokenizer) -> PreTrainedConfig:
    """The model config, with the vocabulary and special ids taken from the tokenizer."""
    eos = tokenizer.eos_token_id
    dropout_fields = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
    dropout = {} if config.dropout is None else dict.fromkeys(dropout_fields, config.dropout)
    if config.init_from:
        model_config = read_checkpoint_config(config.init_from, **dropout)
        if len(tokenizer) > model_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the model in {config.init_from} only "
                f"vocab_size={model_config.vocab_size}: use the model's tokenizer (or a smaller one)"
            )
        if model_config.pad_token_id is None:
            model_config.pad_token_id = eos
        check_weights(config.init_from, model_config)  # build_model loads them: refuse missing or unexpected tensors
        return model_config
    from_tokenizer = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        **dropout,
    )
    if config.preset:
        return GladeConfig.from_preset(config.preset, **from_tokenizer)
    return read_config_file(config.config, **from_tokenizer)


def fit_block_size(config: PretrainConfig, model_config: PreTrainedConfig) -> PretrainConfig:
    """The config with its block size resolved: `--block-size`, or the model's n_positions, which it may not
    exceed."""
    limit = model_config.max_position_embeddings
    block_size = config.block_size or limit
    if block_size > limit:
        raise ValueError(f"--block-size {block_size} is larger than the model's n_positions={limit}")
    return replace(config, block_size=block_size)


def make_accelerator(config: PretrainConfig) -> Accelerator:
    extra: dict[str, Any] = {}
    if config.compile:
        extra["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor")
    if config.report_to != "none":
        extra["log_with"] = config.report_to
    precision = choose_precision(config.mixed_precision, distributed.launch_device())
    # The scheduler steps once per optimizer step, whatever the number of processes.
    accelerator = distributed.make_accelerator(
        precision.mixed_precision, step_scheduler_with_optimizer=False, project_dir=config.output_dir, **extra
    )
    if config.report_to != "none" and not accelerator.log_with:
        raise ValueError(f"--report-to {config.report_to}: no such tracker is installed (e.g. pip install tensorboard)")
    accelerator.print(
        f"glade pretrain: {accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
        f"device {accelerator.device}, precision {precision.describe()}"
    )
    return accelerator


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


def main_process_decides(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """`decide()`, run by the main process only: every rank returns its result, or raises its error."""
    verdict: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            verdict = [decide()]
        except Exception as error:  # the other ranks must hear of any failure, or they would wait forever
            verdict = [error]
    broadcast_object_list(verdict)
    if isinstance(verdict[0], Exception):
        raise verdict[0]
    return verdict[0]


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


def check_launch(config: PretrainConfig, accelerator: Accelerator) -> None:
    """Refuse settings this launch cannot train with, before tokenizing."""
    check_optimizer_fits(config.optimizer, accelerator.distributed_type)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and config.grad_accum != 1:
        raise ValueError("--grad-accum must be 1 under DeepSpeed, which accumulates in its engine: set "
                         "gradient_accumulation_steps in the DeepSpeed config instead")


@dataclass
class Data:
    train: TokenBlocks
    val: TokenBlocks | None
    train_key: str


def prepare_data(
    config: PretrainConfig, sources: tuple[TextSource, TextSource | None], tokenizer, accelerator: Accelerator
) -> Data:
    """Tokenize into the cache (the first process of each machine does it; the others then read it) and split."""
    train_source, val_source = sources
    block_size = config.block_size
    cache_dir = config.cache_dir or default_cache_dir()

    def tokenize(source: TextSource):
        return tokenize_to_cache(
            source, tokenizer, cache_dir, streaming=config.streaming, show_progress=accelerator.is_local_main_process
        )

    with accelerator.local_main_process_first():
        train_tokens = tokenize(train_source)
        val_tokens = tokenize(val_source) if val_source else None
    if val_tokens is not None:
        train, val = TokenBlocks(train_tokens, block_size), TokenBlocks(val_tokens, block_size)
        if len(val) == 0:
            raise ValueError(f"--val-data has {val_tokens.num_tokens} tokens, fewer than one block of {block_size + 1}")
    else:
        train, val = split_train_val(train_tokens, block_size, config.val_fraction)
    accelerator.print(
        f"data: {len(train)} training blocks of {block_size} tokens"
        + (f", {len(val)} validation blocks" if val is not None else ", no validation")
    )
    return Data(train, val, train_tokens.key)


def compiled_cpu_attention(config: PretrainConfig, model_config: GladeConfig, accelerator: Accelerator) -> str:
    """--compile-attention, or with auto what the main process timed fastest for one block at this run's shape: an
    attention kernel to compile with, or UNCOMPILED where the eager block is faster (every process takes its choice,
    so all run alike)."""
    if config.compile_attention != "auto":
        return config.compile_attention
    choice = [None]
    if accelerator.is_main_process:
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
        measured = choose_kernel(model_config, config.batch_size, config.block_size, dtype, uncompiled=True)
        outcome = "compiling" if measured.compiled else "eager is faster at this shape, so the run trains uncompiled"
        accelerator.print(f"--compile on {cpu_name()}: {measured.describe()}; {outcome}")
        choice = [measured.implementation]
    return broadcast_object_list(choice)[0]


def prepare_training(config: PretrainConfig, model_config: PreTrainedConfig, accelerator: Accelerator):
    """The model, optimizer and scheduler, prepared by accelerate for this launch."""
    model = build_model(config, model_config)
    if config.compile and accelerator.device.type == "cpu" and isinstance(model, GladePreTrainedModel):
        if (attention := compiled_cpu_attention(config, model.config, accelerator)) == UNCOMPILED:
            accelerator.state.dynamo_plugin.backend = DynamoBackend.NO  # accelerate.prepare compiles unless told
        else:
            model.set_attn_implementation(attention)
    optimizer = make_optimizer(
        model, config.optimizer, config.lr, config.weight_decay, (config.beta1, config.beta2),
        fused=distributed.can_fuse_optimizer(accelerator), muon_lr=config.muon_lr,
    )
    scheduler = make_scheduler(optimizer, config.warmup_steps, config.max_steps, config.min_lr / config.lr)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed sizes its engine from a prepared DataLoader; Glade's loaders are built per step and rank.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    set_seed(config.seed, device_specific=True)  # different dropout masks on different ranks
    return model, optimizer, scheduler


def build_model(config: PretrainConfig, model_config: PreTrainedConfig) -> torch.nn.Module:
    set_seed(config.seed)  # the same initial weights on every rank
    if config.init_from:
        model = AutoModelForCausalLM.from_pretrained(config.init_from, config=model_config)
    else:
        model = GladeForCausalLM(model_config)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model.train()


@dataclass
class TrainerState:
    """What a checkpoint adds to accelerate's state: where training is, what fixes the data order, and which
    optimizer's state it holds."""

    step: int
    tokens_seen: int
    global_batch_blocks: int
    block_size: int
    seed: int
    max_steps: int
    train_data: str
    optimizer: str
    architecture: dict[str, Any]

    @classmethod
    def start(
        cls, config: PretrainConfig, num_processes: int, train_data: str, model_config: PreTrainedConfig
    ) -> TrainerState:
        return cls(
            step=0,
            tokens_seen=0,
            global_batch_blocks=config.batch_size * config.grad_accum * num_processes,
            block_size=config.block_size,
            seed=config.seed,
            max_steps=config.max_steps,
            train_data=train_data,
            optimizer=config.optimizer,
            architecture=architecture(model_config),
        )


# Model config fields that do not change what the weights compute: how they were initialised, dropout (a training
# setting, --dropout), the cache switch, and the special ids generation reads (a new tokenizer is refused anyway).
NOT_ARCHITECTURE = {"initializer_range", "zero_init", "resid_pdrop", "embd_pdrop", "attn_pdrop", "use_cache",
                    "bos_token_id", "eos_token_id", "pad_token_id"}


def architecture(model_config: PreTrainedConfig) -> dict[str, Any]:
    """The fields of the model's own config class that shape what its weights compute, as JSON would store them."""
    generic = {field.name for field in fields(PreTrainedConfig)}
    values = {field.name: getattr(model_config, field.name) for field in fields(model_config)
              if field.name not in generic | NOT_ARCHITECTURE}
    return json.loads(json.dumps(values))


# The data position is a function of these: if one changes, a resumed run would not see the same data.
DATA_POSITION_FIELDS = {
    "global_batch_blocks": "the global batch (batch size x grad accum x processes)",
    "block_size": "the block size",
    "seed": "the seed",
    "train_data": "the training data or tokenizer",
}


def resume(
    accelerator: Accelerator, config: PretrainConfig, expected: TrainerState, optimizer, scheduler
) -> TrainerState:
    """Load the checkpoint `--resume` names. The data position must match; the optimizer hyperparameters are this
    run's (a changed --lr, --muon-lr, --weight-decay or beta applies from the first resumed step)."""
    path = Path(main_process_decides(
        accelerator, lambda: str(find_checkpoint(config.output_dir, config.resume, fallback=config.resume_fallback))
    ))
    saved = read_trainer_state(path)
    missing = [name for name in ("step", "tokens_seen", "max_steps", *DATA_POSITION_FIELDS) if name not in saved]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: its {TRAINER_STATE} lacks {', '.join(missing)}")
    for name, meaning in DATA_POSITION_FIELDS.items():
        if saved[name] != getattr(expected, name):
            raise ValueError(
                f"cannot resume from {path}: {meaning} changed ({name} was {saved[name]!r}, "
                f"now {getattr(expected, name)!r}), so the run would not continue on the same data"
            )
    check_same_architecture(path, saved.get("architecture"), expected.architecture)
    trained_with = saved.get("optimizer", "adamw")  # checkpoints from before --optimizer existed are AdamW's
    if trained_with != expected.optimizer:
        raise ValueError(f"cannot resume from {path}: it holds the state of --optimizer {trained_with}, "
                         f"not of --optimizer {expected.optimizer}")
    if saved["max_steps"] != expected.max_steps:
        logger.warning("max_steps changed from %s to %s: the learning-rate schedule changes",
                       saved["max_steps"], expected.max_steps)
    hyperparameters = command_line_hyperparameters(optimizer)
    # Model, optimizer, scheduler and every rank's RNG states; the optimizer's state brings the saved run's
    # hyperparameters, which this run's replace.
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as error:  # shapes or names that do not fit this run's model
        raise CheckpointError(f"cannot resume from {path}: it does not fit this run's model and optimizer "
                              f"({one_line(error)})") from error
    restore_hyperparameters(optimizer, scheduler.scheduler, hyperparameters)  # accelerate wraps the LambdaLR
    accelerator.print(f"resumed from {path} at step {saved['step']}")
    set_aside = main_process_decides(accelerator, lambda: set_aside_later_saves(config.output_dir, saved["step"],
                                                                                FINAL_DIR))
    if set_aside is not None:
        accelerator.print(f"moved what {config.output_dir} held from after step {saved['step']} to {set_aside}: "
                          "--resume latest follows this run from now on")
    return TrainerState(**{**asdict(expected), "step": saved["step"], "tokens_seen": saved["tokens_seen"]})


def check_same_architecture(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume into a model that computes something else, even where every tensor keeps its shape.
    Checkpoints from before the architecture was recorded are not checked."""
    if saved is None:
        return
    changed = [f"{name} was {saved.get(name)!r}, now {current.get(name)!r}"
               for name in sorted(saved.keys() | current.keys()) if saved.get(name) != current.get(name)]
    if changed:
        raise ValueError(f"cannot resume from {path}: the model architecture changed ({'; '.join(changed)}): resume "
                         "with the checkpoint's model config, or start a new run with --init-from")


def one_line(error: BaseException) -> str:
    """An error's message on one line (load_state_dict lists every mismatched tensor on its own line)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def tracker_config(config: PretrainConfig) -> dict[str, Any]:
    # Trackers such as TensorBoard's hparams accept only scalars and strings.
    return {
        name: value if isinstance(value, (int, float, str, bool)) else str(value)
        for name, value in asdict(config).items()
    }


# ----------------------------------------------------------------------------------------------------------------
# The loop


def train_loop(
    accelerator: Accelerator, model, optimizer, scheduler, data: Data, tokenizer, state: TrainerState,
    metrics: MetricsLog, config: PretrainConfig,
) -> None:
    sampler = StepBatchSampler(
        len(data.train), config.batch_size, config.grad_accum, accelerator.num_processes, accelerator.process_index,
        seed=config.seed, start_step=state.step,
    )
    batches = iter(make_loader(data.train, sampler, config.num_workers, pin_memory=accelerator.device.type == "cuda"))
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer)).to(accelerator.device)
    # Every position of every block is real text, so a step's tokens are known without asking the device.
    tokens_per_step = config.batch_size * config.block_size * config.grad_accum * accelerator.num_processes
    samples_log = Path(config.output_dir) / "samples" / f"rank-{accelerator.process_index}.jsonl"
    if config.record_samples:
        samples_log.parent.mkdir(exist_ok=True)

    progress = tqdm(total=config.max_steps, initial=state.step, unit="step", disable=not accelerator.is_main_process)
    window = LossWindow(accelerator.device)
    while state.step < config.max_steps:
        micro_batches = [next(batches) for _ in range(config.grad_accum)]
        if config.record_samples:
            record_samples(samples_log, state.step, micro_batches)
        lr = optimizer.param_groups[0]["lr"]  # AdamW's learning rate for this step
        loss, _ = forward_backward(model, accelerator, [model_inputs(b, accelerator.device) for b in micro_batches])
        grad_norm = optimizer_step(model, optimizer, scheduler, accelerator, config.grad_clip)
        state.step += 1
        state.tokens_seen += tokens_per_step
        window.add(loss, state.step)
        progress.update(1)
        last = state.step == config.max_steps
        log_now = state.step % config.log_every == 0 or last
        evaluate_now = data.val is not None and ((config.eval_every and state.step % config.eval_every == 0) or last)
        save_now = config.save_every and state.step % config.save_every == 0
        if log_now or evaluate_now or save_now:  # each waits for the device anyway
            window.check_finite(accelerator)

        if log_now:
            train_loss, tokens_per_sec = window.flush(accelerator, tokens_per_step)
            metrics.log({
                "step": state.step, "train_loss": train_loss, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_seen": state.tokens_seen, "tokens_per_sec": tokens_per_sec,
            })
            progress.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}")

        if evaluate_now:
            result = evaluate(model, accelerator, data.val, config.batch_size, config.eval_batches, byte_lengths)
            if not math.isfinite(result["val_loss"]):
                raise TrainingDiverged(state.step, "non-finite validation loss")
            metrics.log({"step": state.step, "tokens_seen": state.tokens_seen, **result})
            if accelerator.is_main_process:
                progress.write(f"step {state.step}: val loss {result['val_loss']:.4f}, "
                               f"ppl {result['val_ppl']:.2f}, bpb {result['val_bpb']:.4f}")

        if save_now:
            check_finite_weights(model, accelerator, state.step)
            save_checkpoint(accelerator, config.output_dir, state.step, asdict(state), config.keep_last)
    progress.close()


class TrainingDiverged(ValueError):
    """A loss or the weights stopped being finite: nothing from that step on is saved or exported."""

    def __init__(self, step: int, reason: str):
        super().__init__(
            f"training stopped at step {step}: {reason} (nan or inf). Nothing from that step on was saved or "
            "exported; the checkpoints before it are kept (resume one with a lower --lr)"
        )


class LossWindow:
    """Training losses since the last log line, and the first step whose loss was not finite, kept on the device
    so that steps do not wait for them."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)  # this rank's share of each step's mean loss, summed
        self.steps = 0
        self.start = time.perf_counter()
        self.first_non_finite = torch.zeros((), dtype=torch.long, device=device)  # a step, or 0: none yet

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.loss += loss
        self.steps += 1
        self.first_non_finite.masked_fill_(~torch.isfinite(loss) & (self.first_non_finite == 0), step)

    def check_finite(self, accelerator: Accelerator) -> None:
        """Raise TrainingDiverged naming the first step whose loss was not finite on any rank. A collective: every
        rank calls it at the same steps, and all raise together."""
        steps = [step for step in accelerator.gather(self.first_non_finite.reshape(1)).tolist() if step]
        if steps:
            raise TrainingDiverged(min(steps), "non-finite training loss")

    def flush(self, accelerator: Accelerator, tokens_per_step: int) -> tuple[float, float]:
        """(mean loss over the window's steps, tokens per second), and start a new window."""
        mean_loss = accelerator.reduce(self.loss, reduction="sum").item() / self.steps
        tokens_per_sec = self.steps * tokens_per_step / (time.perf_counter() - self.start)
        self.loss.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return mean_loss, tokens_per_sec


def record_samples(path: Path, step: int, micro_batches: list[dict[str, torch.Tensor]]) -> None:
    with open(path, "a") as file:
        file.write(json.dumps({"step": step, "blocks": [batch["index"].tolist() for batch in micro_batches]}) + "\n")


def forward_backward(model, accelerator: Accelerator, micro_batches: list[dict[str, torch.Tensor]]):
    """Accumulate the gradient of the mean loss over every target token of the step, on all ranks.

    Each micro-batch's summed loss is divided by the step's total target count (gathered from all ranks), so
    micro-batches and ranks holding different numbers of real targets are weighted by tokens, not by batch.
    Returns (this rank's share of the step's mean loss, the global target count).
    """
    num_targets = sum((batch["labels"] != IGNORE_INDEX).sum() for batch in micro_batches)
    num_targets = accelerator.reduce(num_targets, reduction="sum")
    total = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # Gradients are all-reduced once, after the last micro-batch.
        with nullcontext() if last else accelerator.no_sync(model):
            # labels only asks for a loss; shift_labels are the targets, already aligned with the inputs.
            loss = model(
                input_ids=batch["input_ids"],
                labels=batch["labels"],
                shift_labels=batch["labels"],
                num_items_in_batch=num_targets,
                use_cache=False,
            ).loss
            # DDP and FSDP average gradients over ranks; the loss is already normalised globally, so undo that.
            accelerator.backward(loss * accelerator.num_processes)
        total += loss.detach()
    return total, num_targets


def optimizer_step(model, optimizer, scheduler, accelerator: Accelerator, grad_clip: float) -> torch.Tensor | None:
    """Clip, step and clear; returns the gradient norm before clipping (None under DeepSpeed, which clips itself)."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a (replicated) DTensor
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@torch.no_grad()
def evaluate(
    model, accelerator: Accelerator, val: TokenBlocks, batch_size: int, max_batches: int, byte_lengths: torch.Tensor
) -> dict[str, float]:
    """Validation loss (nats/token), perplexity and bits per byte over the same blocks every time."""
    model.eval()
    batches = eval_batches(len(val), batch_size, accelerator.num_processes, accelerator.process_index, max_batches)
    loader = make_loader(val, batches, num_workers=0, pin_memory=accelerator.device.type == "cuda")
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # nats, target tokens, text bytes
    for batch in loader:
        inputs = model_inputs(batch, accelerator.device)
        logits = model(input_ids=inputs["input_ids"], use_cache=False).logits
        targets = inputs["labels"]
        totals[0] += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        totals[1] += targets.numel()
        totals[2] += byte_lengths[targets].sum()
    nats, tokens, num_bytes = accelerator.reduce(totals, reduction="sum").tolist()
    model.train()
    loss = nats / tokens
    return {"val_loss": loss, "val_ppl": math.exp(loss), "val_bpb": nats / (num_bytes * math.log(2))}


def check_finite_weights(model, accelerator: Accelerator, step: int) -> None:
    """Refuse to save or export weights that are not finite. An update can make them so while the loss that led
    to it was finite (an infinite learning rate), and the next loss comes too late: a checkpoint would already
    hold them, and --keep-last would have deleted a good one for it. Each rank checks its own parameters (its
    shards under FSDP); a collective."""
    local = [param.to_local() if isinstance(param, DTensor) else param for param in model.parameters()]
    non_finite = torch.stack([~torch.isfinite(param).all() for param in local]).any().float()
    if accelerator.reduce(non_finite, reduction="sum").item() > 0:
        raise TrainingDiverged(step, "its update made the weights non-finite")


def export_final(
    accelerator: Accelerator, model, tokenizer, config: PretrainConfig, metrics: MetricsLog, source: TextSource
) -> Path:
    """Write `final/`: weights (safetensors), tokenizer, generation config, metrics, loss curve, model card and,
    last, the manifest that loading checks."""
    final = Path(config.output_dir) / FINAL_DIR
    # A collective under FSDP and DeepSpeed: every rank calls it. Under --compile the names carry the compiled
    # wrapper's prefix, which a saved model must not.
    state_dict = {
        name.removeprefix(COMPILED_PREFIX): tensor for name, tensor in accelerator.get_state_dict(model).items()
    }
    if not accelerator.is_main_process:
        return final
    records = metrics.records()
    loss_curve = plot_loss_curve(records, Path(config.output_dir) / LOSS_CURVE) if records else None
    with atomic_directory(final) as staging:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        if isinstance(unwrapped, FSDPModule):
            unwrapped = unsharded_twin(unwrapped)
        alias_tied_weights(state_dict, unwrapped)
        model_config = unwrapped.config
        unwrapped.generation_config = GenerationConfig(
            **GENERATION_DEFAULTS,
            bos_token_id=model_config.bos_token_id,
            eos_token_id=model_config.eos_token_id,
            pad_token_id=model_config.pad_token_id,
        )
        unwrapped.save_pretrained(staging, state_dict=state_dict, max_shard_size=config.max_shard_size)
        tokenizer.model_max_length = model_config.max_position_embeddings
        tokenizer.save_pretrained(staging)
        shutil.copy(metrics.path, staging / metrics.path.name)
        write_card(staging, config, source, loss_curve)
        write_manifest(staging, step=config.max_steps)
    accelerator.print(f"saved {final}")
    return final


def unsharded_twin(model: FSDPModule) -> torch.nn.Module:
    """A model whose class save_pretrained may record: FSDP2 swaps a sharded model's class for a generated
    subclass (`FSDPGladeForCausalLM`, defined in torch's `_fsdp_init`), which transformers would write into
    `auto_map` and copy as remote code. The twin is built on the meta device: its weights come from the gathered
    state dict."""
    model_class = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
    with torch.device("meta"):
        return model_class(model.config)


def alias_tied_weights(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """FSDP and DeepSpeed gather a tied parameter once per name, as separate tensors; save_pretrained recognises
    ties by shared storage, so point every tied name at one tensor (saved once, as from an unsharded model)."""
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        tied_to = first_name.setdefault(id(parameter), name)
        if tied_to != name:
            state_dict[name] = state_dict[tied_to]


def write_card(model_dir: Path, config: PretrainConfig, source: TextSource, loss_curve: Path | None) -> None:
    values = asdict(config)
    write_model_card(
        model_dir,
        model_dir / METRICS_FILENAME,
        repo_id=config.hub_model_id,
        dataset_names=list(source.locations) if source.kind == "hub" else [],
        base_model=config.init_from if config.init_from and not Path(config.init_from).exists() else None,
        training_args={name: values[name] for name in CARD_FIELDS}
        | ({"muon_lr": config.muon_lr} if config.optimizer == "muon" else {}),
        loss_curve_png=loss_curve,
    )


def push(final: Path, config: PretrainConfig) -> None:
    from .hub import push_folder

    push_folder(final, config.hub_model_id, private=config.hub_private)


if __name__ == "__main__":
    raise SystemExit(main())
