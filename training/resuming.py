"""Where a `glade pretrain` run stands (`TrainerState`, saved with each checkpoint) and resuming from a checkpoint:
only into the same data position and the same architecture, and along the branch it resumes."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from transformers import PreTrainedConfig

from glade.configuration_glade import GladeConfig

from .checkpointing import TRAINER_STATE, CheckpointError, find_checkpoint, read_trainer_state, set_aside_later_saves
from .distributed import main_process_decides
from .output_dir import FINAL_DIR
from .optim import command_line_hyperparameters, restore_hyperparameters
from .pretrain_config import PretrainConfig

logger = logging.getLogger("glade.pretrain")


@dataclass
class TrainerState:
    """What a checkpoint adds to accelerate's state: where training is, what fixes the data order, and which
    optimizer's state (and weight average) it holds."""

    step: int
    tokens_seen: int
    global_batch_blocks: int
    block_size: int
    seed: int
    max_steps: int
    train_data: str
    optimizer: str
    architecture: dict[str, Any]
    ema_decay: float = 0.0
    normuon: bool = False
    shuffle_documents: bool = False
    batch_ramp_steps: int = 0

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
            ema_decay=config.ema_decay,
            normuon=config.normuon,
            shuffle_documents=config.shuffle_documents,
            batch_ramp_steps=config.batch_ramp_steps,
        )


# Model config fields that do not change what the weights compute: how they were initialised, dropout (a training
# setting, --dropout), the cache switch, and the special ids generation reads (a new tokenizer is refused anyway).
NOT_ARCHITECTURE = {"initializer_range", "zero_init", "resid_pdrop", "embd_pdrop", "attn_pdrop", "use_cache",
                    "bos_token_id", "eos_token_id", "pad_token_id"}


def architecture(model_config: PreTrainedConfig) -> dict[str, Any]:
    """The fields of the model's own config class that shape what its weights compute, as JSON would store them,
    and its RoPE settings where it rotates (an attribute only rotary configs have)."""
    generic = {field.name for field in fields(PreTrainedConfig)}
    values = {field.name: getattr(model_config, field.name) for field in fields(model_config)
              if field.name not in generic | NOT_ARCHITECTURE}
    if getattr(model_config, "rope_parameters", None) is not None:
        values["rope_parameters"] = model_config.rope_parameters
    return json.loads(json.dumps(values))


def with_later_defaults(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """An architecture recorded before some of `current`'s GladeConfig fields, or rotary configs'
    `partial_rotary_factor` (1.0: every channel rotates), existed: those at their defaults, which is what the model
    computed then."""
    defaults = {field.name: field.default for field in fields(GladeConfig)}
    saved = {**{name: defaults[name] for name in current.keys() - saved.keys() if name in defaults}, **saved}
    rope = saved.get("rope_parameters")
    if isinstance(rope, dict):
        return {**saved, "rope_parameters": {"partial_rotary_factor": 1.0, **rope}}
    return saved


# The data position is a function of these: if one changes, a resumed run would not see the same data.
DATA_POSITION_FIELDS = {
    "global_batch_blocks": "the global batch (batch size x grad accum x processes)",
    "block_size": "the block size",
    "seed": "the seed",
    "train_data": "the training data or tokenizer",
}


# Options added later that also fix the data position, with the value a checkpoint from before them ran with.
LATER_DATA_POSITION_OPTIONS = {
    "shuffle_documents": ("--shuffle-documents", False),
    "batch_ramp_steps": ("--batch-ramp-steps", 0),
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
    for name, (flag, before_it_existed) in LATER_DATA_POSITION_OPTIONS.items():
        if (trained := saved.get(name, before_it_existed)) != getattr(expected, name):
            raise ValueError(f"cannot resume from {path}: it was trained with {flag} {trained!r}, not "
                             f"{getattr(expected, name)!r}, so the run would not continue on the same data")
    check_same_architecture(path, saved.get("architecture"), expected.architecture)
    trained_with = saved.get("optimizer", "adamw")  # checkpoints from before --optimizer existed are AdamW's
    if trained_with != expected.optimizer:
        raise ValueError(f"cannot resume from {path}: it holds the state of --optimizer {trained_with}, "
                         f"not of --optimizer {expected.optimizer}")
    if (averaged := saved.get("ema_decay", 0.0)) != expected.ema_decay:
        # The average is a checkpointed object: a run with and one without it hold different state.
        raise ValueError(f"cannot resume from {path}: it was trained with --ema-decay {averaged}, not "
                         f"--ema-decay {expected.ema_decay}")
    if saved.get("normuon", False) != expected.normuon:
        # NorMuon's running mean squares are optimizer state: a run with and one without them hold different state.
        trained = "with" if saved.get("normuon", False) else "without"
        raise ValueError(f"cannot resume from {path}: it was trained {trained} --normuon; resume it the same way")
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
    saved = with_later_defaults(saved, current)
    changed = [f"{name} was {saved.get(name)!r}, now {current.get(name)!r}"
               for name in sorted(saved.keys() | current.keys()) if saved.get(name) != current.get(name)]
    if changed:
        raise ValueError(f"cannot resume from {path}: the model architecture changed ({'; '.join(changed)}): resume "
                         "with the checkpoint's model config, or start a new run with --init-from")


def one_line(error: BaseException) -> str:
    """An error's message on one line (load_state_dict lists every mismatched tensor on its own line)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())

