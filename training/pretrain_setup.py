"""Setting up a `glade pretrain` run: the accelerator, the data, the model and its optimizer, everything the loop
needs before its first step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, DynamoBackend, TorchDynamoPlugin, broadcast_object_list, set_seed
from transformers import AutoModelForCausalLM, PreTrainedConfig

from glade import GladeConfig, GladeForCausalLM, GladePreTrainedModel  # registers glade with the Auto classes
from glade.loading import check_weights, read_checkpoint_config, read_config_file
from glade.hardware import choose_precision, cpu_name

from . import distributed
from .kernel_choice import UNCOMPILED, choose_kernel
from .data import (
    DocumentShuffledBlocks,
    TextSource,
    TokenBlocks,
    default_cache_dir,
    resolve_text_source,
    split_train_val,
    tokenize_to_cache,
)
from .optim import check_optimizer_fits, make_optimizer, make_scheduler
from .weight_average import check_average_fits
from .pretrain_config import PretrainConfig


def resolve_sources(config: PretrainConfig) -> tuple[TextSource, TextSource | None]:
    train = resolve_text_source(config.data, config.text_column, config.data_split, config.data_config)
    if config.val_data is None:
        return train, None
    return train, resolve_text_source(config.val_data, config.text_column, config.val_split, config.data_config)


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


def check_launch(config: PretrainConfig, accelerator: Accelerator) -> None:
    """Refuse settings this launch cannot train with, before tokenizing."""
    check_optimizer_fits(config.optimizer, accelerator.distributed_type)
    check_average_fits(config.ema_decay, accelerator.distributed_type)
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
    if config.shuffle_documents:
        if tokenizer.eos_token_id is None:
            raise ValueError("--shuffle-documents finds documents by their end-of-text token, which this tokenizer "
                             "lacks")
        train = DocumentShuffledBlocks(train.token_file, block_size, tokenizer.eos_token_id, config.seed, train.start,
                                       train.stop)
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
        fused=distributed.can_fuse_optimizer(accelerator), muon_lr=config.muon_lr, muon_options=config.muon_options,
    )
    scheduler = make_scheduler(
        optimizer, config.warmup_steps, config.max_steps, config.min_lr / config.lr, config.weight_decay_schedule
    )
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


def tracker_config(config: PretrainConfig) -> dict[str, Any]:
    # Trackers such as TensorBoard's hparams accept only scalars and strings.
    return {
        name: value if isinstance(value, (int, float, str, bool)) else str(value)
        for name, value in asdict(config).items()
    }

