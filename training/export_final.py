"""The end of a `glade pretrain` run: `final/`, a model folder that `from_pretrained` loads, with its tokenizer,
metrics, loss curve, model card and manifest; then, if asked, the push to the Hub."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from accelerate import Accelerator
from transformers import GenerationConfig

from glade.atomic import atomic_directory
from glade.loading import COMPILED_PREFIX
from glade.manifest import write_manifest

from .data import TextSource
from .hub import push_folder
from .metrics import METRICS_FILENAME, MetricsLog
from .model_card import LOSS_CURVE, write_model_card
from .output_dir import FINAL_DIR
from .plots import plot_loss_curve
from .pretrain_config import PretrainConfig


# Sampling defaults shipped in final/generation_config.json, so `pipeline("text-generation")` samples sensibly. Not a
# length (it would override a caller's max_length) nor a repetition penalty (greedy would no longer be greedy).
GENERATION_DEFAULTS = dict(do_sample=True, temperature=0.8, top_k=50)


# The hyperparameters a model card lists (plus muon_lr and Muon's refinements under --optimizer muon).
CARD_FIELDS = ("max_steps", "batch_size", "grad_accum", "block_size", "lr", "min_lr", "warmup_steps", "weight_decay",
               "grad_clip", "mixed_precision", "seed", "optimizer")


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
        | ({"muon_lr": config.muon_lr} if config.optimizer == "muon" else {})
        | {name: True for name, on in asdict(config.muon_options).items() if on}
        | ({"weight_decay_schedule": "linear"} if config.weight_decay_schedule == "linear" else {})
        | ({"ema_decay": config.ema_decay} if config.ema_decay else {}),
        loss_curve_png=loss_curve,
    )


def push(final: Path, config: PretrainConfig) -> None:
    push_folder(final, config.hub_model_id, private=config.hub_private)

