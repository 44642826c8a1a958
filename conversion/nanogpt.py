"""nanoGPT (karpathy/nanoGPT) `ckpt.pt` checkpoints into Glade.

nanoGPT's `GPT` already uses `nn.Linear` and GPT-2's parameter names, exact GELU, LayerNorm eps 1e-5 and a head
tied to the embedding; `bias=False` drops every Linear and LayerNorm bias, which Glade's `bias` flag mirrors.
"""

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from glade import GladeConfig, GladeForCausalLM

from .saving import Conversion, save_conversion
from .io import load_torch_file
from .state_dict import StateDict, model_from_state_dict, nanogpt_to_glade

REQUIRED_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
NANOGPT_LAYER_NORM_EPSILON = 1e-5  # F.layer_norm's default, which nanoGPT's LayerNorm uses


def glade_config_from_nanogpt(model_args: dict[str, Any], **overrides: Any) -> GladeConfig:
    """The Glade config of a nanoGPT `GPTConfig` (as saved in `ckpt["model_args"]`), with fields overridden."""
    if missing := [name for name in REQUIRED_MODEL_ARGS if name not in model_args]:
        raise ValueError(f"nanoGPT model_args lacks {', '.join(missing)}")
    dropout = model_args.get("dropout", 0.0)
    fields = dict(
        vocab_size=model_args["vocab_size"],
        n_positions=model_args["block_size"],
        n_embd=model_args["n_embd"],
        n_layer=model_args["n_layer"],
        n_head=model_args["n_head"],
        activation_function="gelu",
        bias=model_args["bias"],
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        layer_norm_epsilon=NANOGPT_LAYER_NORM_EPSILON,
    )
    return GladeConfig(**{**fields, **overrides})


def load_nanogpt_checkpoint(path: Path) -> tuple[StateDict, dict[str, Any]]:
    """The model state dict and model_args of a nanoGPT `ckpt.pt` (loaded with weights_only=True)."""
    checkpoint = load_torch_file(Path(path))
    if not isinstance(checkpoint, dict) or (missing := [k for k in ("model", "model_args") if k not in checkpoint]):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not a nanoGPT checkpoint: it needs 'model' and 'model_args' entries, found {found}"
        )
    return checkpoint["model"], checkpoint["model_args"]


def load_nanogpt_as_glade(
    path: Path, *, crop_vocab: int | None = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> GladeForCausalLM:
    """A nanoGPT checkpoint as an in-memory Glade model.

    `crop_vocab` drops the padded embedding rows; `tokenizer` (the one the model was trained with) supplies the
    bos/eos ids and must not have more tokens than the model.
    """
    state_dict, model_args = load_nanogpt_checkpoint(path)
    overrides: dict[str, Any] = {}
    if crop_vocab is not None:
        overrides["vocab_size"] = crop_vocab
    if tokenizer is not None:
        vocab_size = overrides.get("vocab_size", model_args.get("vocab_size"))
        if vocab_size is not None and len(tokenizer) > vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size={vocab_size}"
            )
        overrides.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = glade_config_from_nanogpt(model_args, **overrides)
    return model_from_state_dict(GladeForCausalLM, config, nanogpt_to_glade(state_dict, config))


def convert_nanogpt(
    checkpoint: str | Path,
    destination: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    crop_vocab: int | None = None,
    overwrite: bool = False,
) -> Conversion:
    """Convert a nanoGPT `ckpt.pt` into a Glade checkpoint folder.

    nanoGPT checkpoints carry no tokenizer: `tokenizer_dir` (e.g. GPT-2's) is copied in, and its special tokens
    become the model's bos/eos ids. `crop_vocab` (e.g. 50257 for a GPT-2 vocabulary padded to 50304) keeps only the
    token embeddings the tokenizer can produce.
    """
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"Tokenizer directory {tokenizer_dir} not found")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = load_nanogpt_as_glade(Path(checkpoint), crop_vocab=crop_vocab, tokenizer=tokenizer)
    return save_conversion(
        model, Path(destination), overwrite=overwrite, tokenizer_dir=tokenizer_dir, source_name=str(checkpoint)
    )
