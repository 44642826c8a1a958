"""`glade pretrain`: pre-train (or continue pre-training) a Glade model with Accelerate.

Runs as a plain process (`glade pretrain ...`, `python -m glade.training.pretrain ...`) or under
`accelerate launch` for DDP / FSDP / DeepSpeed; from Python, `pretrain(PretrainConfig(...))`. The loop is
nanoGPT's: fetch a step's micro-batches, forward and backward each, clip, step; evaluate, log and checkpoint every
so often; export `final/` at the end. What a run is told: `pretrain_config`; its setup: `pretrain_setup`; resuming:
`resuming`; the export: `export_final`.

Every rank runs the same steps and the same collectives; only the main process writes logs, checkpoint markers
and the export (sharded checkpoints are written by every rank through `accelerator.save_state`).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from accelerate import Accelerator
from tqdm.auto import tqdm

from glade.atomic import check_writable_directory
from glade.cli import main as glade_main

from .checkpointing import remove_stale_staging, save_checkpoint
from .data import IGNORE_INDEX, StepBatchSampler, TokenBlocks, eval_batches, make_loader, model_inputs
from .export_final import export_final, push
from .metrics import MetricsLog
from .output_dir import check_no_earlier_run, one_run_per_output_dir
from .pretrain_config import PretrainConfig
from .pretrain_setup import (
    Data,
    build_model_config,
    check_launch,
    fit_block_size,
    make_accelerator,
    prepare_data,
    prepare_training,
    resolve_sources,
    tracker_config,
)
from .resuming import TrainerState, resume
from .tokenizer import load_tokenizer, token_byte_lengths
from .weight_average import WeightAverage

logger = logging.getLogger("glade.pretrain")


def main(argv: list[str] | None = None) -> int:
    """`python -m glade.training.pretrain` (and `accelerate launch -m glade.training.pretrain`): `glade pretrain`."""
    return glade_main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


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
        average = None
        if config.ema_decay:
            average = WeightAverage(model, config.ema_decay)
            accelerator.register_for_checkpointing(average)  # before resume, which restores it
        state = TrainerState.start(config, accelerator.num_processes, data.train_key, model_config)
        if config.resume:
            state = resume(accelerator, config, state, optimizer, scheduler)
        if accelerator.is_main_process:
            remove_stale_staging(config.output_dir)
        if config.report_to != "none":
            accelerator.init_trackers("glade-pretrain", config=tracker_config(config))
        metrics = MetricsLog(config.output_dir, accelerator, resume_step=state.step if config.resume else None)

        train_loop(accelerator, model, optimizer, scheduler, data, tokenizer, state, metrics, config, average)
        with averaged(model, average):
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


def averaged(model, average: WeightAverage | None):
    """The model with the weight average swapped in, where the run keeps one."""
    return nullcontext() if average is None else average.applied(model)


def train_loop(
    accelerator: Accelerator, model, optimizer, scheduler, data: Data, tokenizer, state: TrainerState,
    metrics: MetricsLog, config: PretrainConfig, average: WeightAverage | None = None,
) -> None:
    sampler = StepBatchSampler(
        len(data.train), config.batch_size, config.grad_accum, accelerator.num_processes, accelerator.process_index,
        seed=config.seed, start_step=state.step, epoch_items=config.shuffle_documents,
        ramp_steps=config.batch_ramp_steps,
    )
    batches = iter(make_loader(data.train, sampler, config.num_workers, pin_memory=accelerator.device.type == "cuda"))
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer)).to(accelerator.device)
    # Every position of every block is real text, so a step's tokens are known without asking the device.
    tokens_per_micro_batch = config.batch_size * config.block_size * accelerator.num_processes
    samples_log = Path(config.output_dir) / "samples" / f"rank-{accelerator.process_index}.jsonl"
    if config.record_samples:
        samples_log.parent.mkdir(exist_ok=True)

    progress = tqdm(total=config.max_steps, initial=state.step, unit="step", disable=not accelerator.is_main_process)
    window = LossWindow(accelerator.device)
    while state.step < config.max_steps:
        micro_batches = [next(batches) for _ in range(sampler.ramp.micro_batches(state.step))]
        if config.record_samples:
            record_samples(samples_log, state.step, micro_batches)
        lr = optimizer.param_groups[0]["lr"]  # AdamW's learning rate for this step
        loss, _ = forward_backward(model, accelerator, [model_inputs(b, accelerator.device) for b in micro_batches])
        grad_norm = optimizer_step(model, optimizer, scheduler, accelerator, config.grad_clip)
        state.step += 1
        if average is not None:
            average.update(model, state.step)
        state.tokens_seen += len(micro_batches) * tokens_per_micro_batch
        window.add(loss, state.step, len(micro_batches) * tokens_per_micro_batch)
        progress.update(1)
        last = state.step == config.max_steps
        log_now = state.step % config.log_every == 0 or last
        evaluate_now = data.val is not None and ((config.eval_every and state.step % config.eval_every == 0) or last)
        save_now = config.save_every and state.step % config.save_every == 0
        if log_now or evaluate_now or save_now:  # each waits for the device anyway
            window.check_finite(accelerator)

        if log_now:
            train_loss, tokens_per_sec = window.flush(accelerator)
            metrics.log({
                "step": state.step, "train_loss": train_loss, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_seen": state.tokens_seen, "tokens_per_sec": tokens_per_sec,
            })
            progress.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}")

        if evaluate_now:
            with averaged(model, average):
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
        self.steps = self.tokens = 0
        self.start = time.perf_counter()
        self.first_non_finite = torch.zeros((), dtype=torch.long, device=device)  # a step, or 0: none yet

    def add(self, loss: torch.Tensor, step: int, tokens: int) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens
        self.first_non_finite.masked_fill_(~torch.isfinite(loss) & (self.first_non_finite == 0), step)

    def check_finite(self, accelerator: Accelerator) -> None:
        """Raise TrainingDiverged naming the first step whose loss was not finite on any rank. A collective: every
        rank calls it at the same steps, and all raise together."""
        steps = [step for step in accelerator.gather(self.first_non_finite.reshape(1)).tolist() if step]
        if steps:
            raise TrainingDiverged(min(steps), "non-finite training loss")

    def flush(self, accelerator: Accelerator) -> tuple[float, float]:
        """(mean loss over the window's steps, tokens per second), and start a new window."""
        mean_loss = accelerator.reduce(self.loss, reduction="sum").item() / self.steps
        tokens_per_sec = self.tokens / (time.perf_counter() - self.start)
        self.loss.zero_()
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()
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


if __name__ == "__main__":
    raise SystemExit(main())
