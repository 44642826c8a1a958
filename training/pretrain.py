"""`glade pretrain`: pre-train (or continue pre-training) a Glade model with Accelerate.

Runs as a plain process (`glade pretrain ...`, `python -m glade.training.pretrain ...`) or under
`accelerate launch` for DDP / FSDP / DeepSpeed. The loop is nanoGPT's: fetch a step's micro-batches, forward and
backward each, clip, step; evaluate, log and checkpoint every so often; export `final/` at the end.

Every rank runs the same steps and the same collectives; only the main process writes logs, checkpoint markers
and the export (sharded checkpoints are written by every rank through `accelerator.save_state`).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from accelerate import Accelerator
from accelerate.utils import DistributedType, TorchDynamoPlugin, broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedConfig

from glade import GladeConfig, GladeForCausalLM  # importing glade registers it with the Auto classes

from glade.atomic import atomic_directory, check_writable_directory
from . import distributed
from .checkpoint import (
    CheckpointError,
    find_checkpoint,
    list_checkpoints,
    read_trainer_state,
    remove_stale_staging,
    save_checkpoint,
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
from .model_card import write_model_card
from .optim import make_optimizer, make_scheduler
from .plots import plot_loss_curve
from .tokenizer import load_tokenizer, token_byte_lengths

logger = logging.getLogger("glade.pretrain")

FINAL_DIR = "final"
LOSS_CURVE = "loss_curve.png"
COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper holds the model as `_orig_mod`
# Sampling defaults shipped in final/generation_config.json, so `pipeline("text-generation")` samples sensibly.
GENERATION_DEFAULTS = dict(do_sample=True, temperature=0.8, top_k=50, max_new_tokens=100)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (choose one)")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a named architecture: glade-tiny, glade-small, gpt2, gpt3-small, ...")
    source.add_argument("--config", help="a JSON file of GladeConfig fields (a saved config.json works)")
    source.add_argument("--init-from", help="continue pre-training a saved causal LM (directory or Hub id)")
    model.add_argument("--dropout", type=float, default=None, help="override all dropout probabilities")

    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", required=True,
                      help=".txt/.jsonl/.parquet files (globs ok), a dataset folder, or a Hub dataset id")
    data.add_argument("--tokenizer", required=True, help="tokenizer directory (see `glade train-tokenizer`)")
    data.add_argument("--text-column", default="text", help="column holding the documents (default: text)")
    data.add_argument("--data-split", default="train", help="split of a Hub --data dataset (default: train)")
    data.add_argument("--data-config", default=None, help="configuration name of a Hub dataset")
    data.add_argument("--val-data", nargs="+", default=None, help="validation documents (default: --val-fraction)")
    data.add_argument("--val-split", default="validation", help="split of a Hub --val-data dataset")
    data.add_argument("--val-fraction", type=float, default=0.05, help="last fraction of the tokens held out")
    data.add_argument("--streaming", action="store_true", help="stream while tokenizing (corpora larger than memory)")
    data.add_argument("--cache-dir", default=None, help=f"token cache (default: {default_cache_dir()})")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")

    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", required=True)
    train.add_argument("--max-steps", type=int, required=True, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=8, help="blocks per micro-batch per process")
    train.add_argument("--block-size", type=int, default=None, help="tokens per block (default: n_positions)")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    train.add_argument("--min-lr", type=float, default=None, help="learning rate at the end (default: lr / 10)")
    train.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: 5%% of max steps)")
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--beta1", type=float, default=0.9)
    train.add_argument("--beta2", type=float, default=0.95)
    train.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    train.add_argument("--mixed-precision", choices=["bf16", "no"], default="bf16", help="bf16 autocast or full fp32")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument("--seed", type=int, default=1337)

    progress = parser.add_argument_group("evaluation, logging and checkpoints")
    progress.add_argument("--eval-every", type=int, default=250, help="validate every K steps (0: only at the end)")
    progress.add_argument("--eval-batches", type=int, default=20, help="validation batches per process")
    progress.add_argument("--log-every", type=int, default=10, help="log training metrics every K steps")
    progress.add_argument("--report-to", default="none", help="Accelerate tracker: tensorboard, wandb, all, none")
    progress.add_argument("--save-every", type=int, default=1000, help="checkpoint every K steps (0: never)")
    progress.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep (0: all)")
    progress.add_argument("--resume", default=None, metavar="latest|PATH", help="resume from a checkpoint")
    progress.add_argument("--resume-fallback", action="store_true",
                          help="if that checkpoint is damaged, resume from the newest complete one before it")
    progress.add_argument("--record-samples", action="store_true",
                          help="debug: each process logs the blocks it trains on to OUTPUT_DIR/samples/")

    export = parser.add_argument_group("export")
    export.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard in final/")
    export.add_argument("--push-to-hub", action="store_true", help="upload final/ to the Hub")
    export.add_argument("--hub-model-id", default=None, help="ORG/NAME of the Hub repository")
    export.add_argument("--hub-private", action="store_true", help="create the Hub repository as private")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glade pretrain", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_every", "save_every", "keep_last", "num_workers"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.min_lr is not None and not 0 <= args.min_lr <= args.lr:
        raise ValueError(f"--min-lr must be between 0 and --lr ({args.lr}), got {args.min_lr}")
    if args.block_size is not None and args.block_size < 1:
        raise ValueError(f"--block-size must be >= 1, got {args.block_size}")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push-to-hub needs --hub-model-id ORG/NAME")
    if args.resume is None:
        existing = [path.name for _, path in list_checkpoints(args.output_dir)]
        if existing or (Path(args.output_dir) / FINAL_DIR).exists():
            raise ValueError(
                f"output directory {args.output_dir} already holds a training run "
                f"({', '.join(existing) or FINAL_DIR}): continue it with --resume latest or choose another --output-dir"
            )


# ----------------------------------------------------------------------------------------------------------------
# Setup: model, accelerator, data


def build_config(args: argparse.Namespace, tokenizer) -> PreTrainedConfig:
    """The model config, with the vocabulary and special ids taken from the tokenizer."""
    eos = tokenizer.eos_token_id
    dropout_fields = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
    dropout = {} if args.dropout is None else dict.fromkeys(dropout_fields, args.dropout)
    if args.init_from:
        config = AutoConfig.from_pretrained(args.init_from, **dropout)
        if len(tokenizer) > config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the model in {args.init_from} only "
                f"vocab_size={config.vocab_size}: use the model's tokenizer (or a smaller one)"
            )
        if config.pad_token_id is None:
            config.pad_token_id = eos
        return config
    from_tokenizer = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        **dropout,
    )
    if args.preset:
        return GladeConfig.from_preset(args.preset, **from_tokenizer)
    return GladeConfig.from_dict({**read_config_file(args.config), **from_tokenizer})


def read_config_file(path: str) -> dict[str, Any]:
    """GladeConfig fields from a JSON file; a misspelt field is an error rather than silently ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    values = json.loads(path.read_text())
    # A saved config.json also carries bookkeeping keys, such as model_type and auto_map.
    known = {field.name for field in fields(GladeConfig)} | set(GladeConfig().to_dict()) | {"auto_map"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"model config {path} has unknown GladeConfig field(s): {', '.join(unknown)}")
    return values


def resolve_block_size(args: argparse.Namespace, config: PreTrainedConfig) -> int:
    limit = config.max_position_embeddings
    block_size = args.block_size or limit
    if block_size > limit:
        raise ValueError(f"--block-size {block_size} is larger than the model's n_positions={limit}")
    return block_size


def build_model(args: argparse.Namespace, config: PreTrainedConfig) -> torch.nn.Module:
    set_seed(args.seed)  # the same initial weights on every rank
    if args.init_from:
        model = AutoModelForCausalLM.from_pretrained(args.init_from, config=config)
    else:
        model = GladeForCausalLM(config)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model.train()


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    # Trackers such as TensorBoard's hparams accept only scalars and strings.
    return {
        name: value if isinstance(value, (int, float, str, bool)) else str(value)
        for name, value in vars(args).items()
        if name != "func"
    }


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    extra: dict[str, Any] = {}
    if args.compile:
        extra["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor")
    if args.report_to != "none":
        extra["log_with"] = args.report_to
    # The scheduler steps once per optimizer step, whatever the number of processes.
    accelerator = distributed.make_accelerator(
        args.mixed_precision, step_scheduler_with_optimizer=False, project_dir=args.output_dir, **extra
    )
    if args.report_to != "none" and not accelerator.log_with:
        raise ValueError(f"--report-to {args.report_to}: no such tracker is installed (e.g. pip install tensorboard)")
    compute = "bf16 autocast, fp32 weights" if accelerator.mixed_precision == "bf16" else "fp32"
    accelerator.print(
        f"glade pretrain: {accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
        f"device {accelerator.device}, precision {compute}"
    )
    return accelerator


@dataclass
class Data:
    train: TokenBlocks
    val: TokenBlocks | None
    train_key: str


def resolve_sources(args: argparse.Namespace) -> tuple[TextSource, TextSource | None]:
    train = resolve_source(args.data, args.text_column, args.data_split, args.data_config)
    if args.val_data is None:
        return train, None
    return train, resolve_source(args.val_data, args.text_column, args.val_split, args.data_config)


def prepare_data(
    args: argparse.Namespace, sources: tuple[TextSource, TextSource | None], tokenizer, accelerator: Accelerator
) -> Data:
    """Tokenize into the cache (the first process of each machine does it; the others then read it) and split."""
    train_source, val_source = sources
    block_size = args.block_size
    cache_dir = args.cache_dir or default_cache_dir()

    def tokenize(source: TextSource):
        return tokenize_to_cache(
            source, tokenizer, cache_dir, streaming=args.streaming, show_progress=accelerator.is_local_main_process
        )

    with accelerator.local_main_process_first():
        train_tokens = tokenize(train_source)
        val_tokens = tokenize(val_source) if val_source else None
    if val_tokens is not None:
        train, val = TokenBlocks(train_tokens, block_size), TokenBlocks(val_tokens, block_size)
        if len(val) == 0:
            raise ValueError(f"--val-data has {val_tokens.num_tokens} tokens, fewer than one block of {block_size + 1}")
    else:
        train, val = split_train_val(train_tokens, block_size, args.val_fraction)
    accelerator.print(
        f"data: {len(train)} training blocks of {block_size} tokens"
        + (f", {len(val)} validation blocks" if val is not None else ", no validation")
    )
    return Data(train, val, train_tokens.key)


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step


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


# ----------------------------------------------------------------------------------------------------------------
# Resume, export


@dataclass
class TrainerState:
    """What a checkpoint adds to accelerate's state: where training is, and what fixes the data order."""

    step: int
    tokens_seen: int
    global_batch_blocks: int
    block_size: int
    seed: int
    max_steps: int
    train_data: str


# The data position is a function of these: if one changes, a resumed run would not see the same data.
DATA_POSITION_FIELDS = {
    "global_batch_blocks": "the global batch (batch size x grad accum x processes)",
    "block_size": "the block size",
    "seed": "the seed",
    "train_data": "the training data or tokenizer",
}


def agree_on_checkpoint(accelerator: Accelerator, args: argparse.Namespace) -> Path:
    """The checkpoint to resume from, chosen (and verified) by the main process and shared with all ranks."""
    choice: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            choice = [str(find_checkpoint(args.output_dir, args.resume, fallback=args.resume_fallback))]
        except CheckpointError as error:
            choice = [error]
    broadcast_object_list(choice)
    if isinstance(choice[0], Exception):
        raise choice[0]
    return Path(choice[0])


def resume(accelerator: Accelerator, args: argparse.Namespace, expected: TrainerState) -> TrainerState:
    path = agree_on_checkpoint(accelerator, args)
    saved = read_trainer_state(path)
    for name, meaning in DATA_POSITION_FIELDS.items():
        if saved[name] != getattr(expected, name):
            raise ValueError(
                f"cannot resume from {path}: {meaning} changed ({name} was {saved[name]!r}, "
                f"now {getattr(expected, name)!r}), so the run would not continue on the same data"
            )
    if saved["max_steps"] != expected.max_steps:
        logger.warning("max_steps changed from %s to %s: the learning-rate schedule changes",
                       saved["max_steps"], expected.max_steps)
    # Model, optimizer, scheduler and every rank's RNG states.
    accelerator.load_state(str(path))
    accelerator.print(f"resumed from {path} at step {saved['step']}")
    return TrainerState(**{**asdict(expected), "step": saved["step"], "tokens_seen": saved["tokens_seen"]})


def export_final(
    accelerator: Accelerator, model, tokenizer, args: argparse.Namespace, metrics: MetricsLog, source: TextSource
) -> Path:
    """Write `final/`: weights (safetensors), tokenizer, generation config, metrics, loss curve and model card."""
    final = Path(args.output_dir) / FINAL_DIR
    # A collective under FSDP and DeepSpeed: every rank calls it. Under --compile the names carry the compiled
    # wrapper's prefix, which a saved model must not.
    state_dict = {
        name.removeprefix(COMPILED_PREFIX): tensor for name, tensor in accelerator.get_state_dict(model).items()
    }
    if not accelerator.is_main_process:
        return final
    records = metrics.records()
    loss_curve = plot_loss_curve(records, Path(args.output_dir) / LOSS_CURVE) if records else None
    with atomic_directory(final) as staging:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        if isinstance(unwrapped, FSDPModule):
            unwrapped = unsharded_twin(unwrapped)
        alias_tied_weights(state_dict, unwrapped)
        config = unwrapped.config
        unwrapped.generation_config = GenerationConfig(
            **GENERATION_DEFAULTS,
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )
        unwrapped.save_pretrained(staging, state_dict=state_dict, max_shard_size=args.max_shard_size)
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(staging)
        shutil.copy(metrics.path, staging / metrics.path.name)
        write_card(staging, args, source, loss_curve)
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


def write_card(model_dir: Path, args: argparse.Namespace, source: TextSource, loss_curve: Path | None) -> None:
    write_model_card(
        model_dir,
        model_dir / METRICS_FILENAME,
        repo_id=args.hub_model_id,
        dataset_names=list(source.locations) if source.kind == "hub" else [],
        base_model=args.init_from if args.init_from and not Path(args.init_from).exists() else None,
        training_args={
            name: getattr(args, name)
            for name in ("max_steps", "batch_size", "grad_accum", "block_size", "lr", "min_lr", "warmup_steps",
                         "weight_decay", "grad_clip", "mixed_precision", "seed")
        },
        loss_curve_png=loss_curve,
    )


def push(final: Path, args: argparse.Namespace) -> None:
    from .hub import push_folder

    push_folder(final, args.hub_model_id, private=args.hub_private)


# ----------------------------------------------------------------------------------------------------------------
# The run


def pretrain(args: argparse.Namespace) -> Path:
    """Train as `args` says and return the `final/` directory."""
    check_arguments(args)
    sources = resolve_sources(args)  # missing or empty files fail here, before any heavy work
    tokenizer = load_tokenizer(args.tokenizer)
    config = build_config(args, tokenizer)
    args.block_size = resolve_block_size(args, config)
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.warmup_steps = max(1, args.max_steps // 20) if args.warmup_steps is None else args.warmup_steps
    check_writable_directory(args.output_dir)

    accelerator = make_accelerator(args)
    data = prepare_data(args, sources, tokenizer, accelerator)
    model = build_model(args, config)
    optimizer = make_optimizer(
        model, args.lr, args.weight_decay, (args.beta1, args.beta2), fused=distributed.can_fuse_optimizer(accelerator)
    )
    scheduler = make_scheduler(optimizer, args.warmup_steps, args.max_steps, args.min_lr)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if args.grad_accum != 1:
            raise ValueError("--grad-accum must be 1 under DeepSpeed, which accumulates in its engine: set "
                             "gradient_accumulation_steps in the DeepSpeed config instead")
        # DeepSpeed sizes its engine from a prepared DataLoader; Glade's loaders are built per step and rank.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    set_seed(args.seed, device_specific=True)  # different dropout masks on different ranks

    state = TrainerState(
        step=0,
        tokens_seen=0,
        global_batch_blocks=args.batch_size * args.grad_accum * accelerator.num_processes,
        block_size=args.block_size,
        seed=args.seed,
        max_steps=args.max_steps,
        train_data=data.train_key,
    )
    if args.resume:
        state = resume(accelerator, args, state)
    if accelerator.is_main_process:
        remove_stale_staging(args.output_dir)
    if args.report_to != "none":
        accelerator.init_trackers("glade-pretrain", config=tracker_config(args))
    metrics = MetricsLog(args.output_dir, accelerator, resume_step=state.step if args.resume else None)

    train_loop(accelerator, model, optimizer, scheduler, data, tokenizer, state, metrics, args)
    final = export_final(accelerator, model, tokenizer, args, metrics, sources[0])
    if args.push_to_hub and accelerator.is_main_process:
        push(final, args)
    # Free the DDP/FSDP wrappers while the process group is still alive. If DDP's reducer held the last reference
    # to the gloo process group, its destructor would wait for gloo's worker threads with the GIL held while one of
    # them needs the GIL to release a tensor: a hang at exit (pytorch/pytorch#56297). destroy_process_group, in
    # end_training, releases the GIL first.
    del model, optimizer, scheduler
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return final


class LossWindow:
    """Training losses since the last log line, kept on the device so that steps do not wait for it."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)  # this rank's share of each step's mean loss, summed
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

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


def train_loop(
    accelerator: Accelerator, model, optimizer, scheduler, data: Data, tokenizer, state: TrainerState,
    metrics: MetricsLog, args: argparse.Namespace,
) -> None:
    sampler = StepBatchSampler(
        len(data.train), args.batch_size, args.grad_accum, accelerator.num_processes, accelerator.process_index,
        seed=args.seed, start_step=state.step,
    )
    batches = iter(make_loader(data.train, sampler, args.num_workers, pin_memory=accelerator.device.type == "cuda"))
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer)).to(accelerator.device)
    # Every position of every block is real text, so a step's tokens are known without asking the device.
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * accelerator.num_processes
    samples_log = Path(args.output_dir) / "samples" / f"rank-{accelerator.process_index}.jsonl"
    if args.record_samples:
        samples_log.parent.mkdir(exist_ok=True)

    progress = tqdm(total=args.max_steps, initial=state.step, unit="step", disable=not accelerator.is_main_process)
    window = LossWindow(accelerator.device)
    while state.step < args.max_steps:
        micro_batches = [next(batches) for _ in range(args.grad_accum)]
        if args.record_samples:
            record_samples(samples_log, state.step, micro_batches)
        lr = scheduler.get_last_lr()[0]
        loss, _ = forward_backward(model, accelerator, [model_inputs(b, accelerator.device) for b in micro_batches])
        grad_norm = optimizer_step(model, optimizer, scheduler, accelerator, args.grad_clip)
        state.step += 1
        state.tokens_seen += tokens_per_step
        window.add(loss)
        progress.update(1)
        last = state.step == args.max_steps

        if state.step % args.log_every == 0 or last:
            train_loss, tokens_per_sec = window.flush(accelerator, tokens_per_step)
            metrics.log({
                "step": state.step, "train_loss": train_loss, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_seen": state.tokens_seen, "tokens_per_sec": tokens_per_sec,
            })
            progress.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}")

        if data.val is not None and ((args.eval_every and state.step % args.eval_every == 0) or last):
            result = evaluate(model, accelerator, data.val, args.batch_size, args.eval_batches, byte_lengths)
            metrics.log({"step": state.step, "tokens_seen": state.tokens_seen, **result})
            if accelerator.is_main_process:
                progress.write(f"step {state.step}: val loss {result['val_loss']:.4f}, "
                               f"ppl {result['val_ppl']:.2f}, bpb {result['val_bpb']:.4f}")

        if args.save_every and state.step % args.save_every == 0:
            save_checkpoint(accelerator, args.output_dir, state.step, asdict(state), args.keep_last)
    progress.close()


def run(args: argparse.Namespace) -> None:
    """The command-line entry: `glade pretrain` and `python -m glade.training.pretrain`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pretrain(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as error:
        parser.exit(2, f"glade pretrain: error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
