"""`glade params`: where a Glade model's parameters live, computed from its config alone.

The count is a formula over the config, so even GPT-3 175B is broken down instantly without allocating it.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from .configuration_glade import PRESETS, GladeConfig
from .generate import TINY_RANDOM, default_model
from .tiny import tiny_config


@dataclass(frozen=True)
class Component:
    """One group of parameters: a readable name, how its size is computed, and the size."""

    name: str
    formula: str
    count: int


@dataclass(frozen=True)
class ParameterCount:
    """A Glade model's parameters by component. `block_*` components are per transformer block."""

    token_embedding: Component
    position_embedding: Component
    block_layer_norms: Component
    block_attention: Component
    block_mlp: Component
    n_layer: int
    final_norm: Component
    head: Component

    @property
    def per_block(self) -> int:
        return self.block_layer_norms.count + self.block_attention.count + self.block_mlp.count

    @property
    def blocks(self) -> int:
        return self.n_layer * self.per_block

    @property
    def total(self) -> int:
        embeddings = self.token_embedding.count + self.position_embedding.count
        return embeddings + self.blocks + self.final_norm.count + self.head.count


def _linear(n_in: int, n_out: int, bias: bool) -> tuple[str, int]:
    if bias:
        return f"({n_in:,} x {n_out:,} + {n_out:,})", n_in * n_out + n_out
    return f"{n_in:,} x {n_out:,}", n_in * n_out


def _layer_norm(width: int, bias: bool) -> tuple[str, int]:
    return (f"{width:,} + {width:,}", 2 * width) if bias else (f"{width:,}", width)


def _sum_of(name: str, *parts: tuple[str, int]) -> Component:
    return Component(name, " + ".join(formula for formula, _ in parts), sum(count for _, count in parts))


def count_parameters(config: GladeConfig) -> ParameterCount:
    """Count the parameters a `GladeForCausalLM` built from `config` has, without building it."""
    width, bias = config.n_embd, config.bias
    norm_formula, norm_count = _layer_norm(width, bias)
    if config.tie_word_embeddings:
        head = Component("head (lm_head)", "tied to wte", 0)
    else:
        head = Component("head (lm_head)", *_linear(width, config.vocab_size, bias=False))
    return ParameterCount(
        token_embedding=Component(
            "token embedding (wte)", f"{config.vocab_size:,} x {width:,}", config.vocab_size * width
        ),
        position_embedding=Component(
            "position embedding (wpe)", f"{config.n_positions:,} x {width:,}", config.n_positions * width
        ),
        block_layer_norms=Component(
            "layer norms (ln_1, ln_2)", f"2 x ({norm_formula})" if bias else f"2 x {norm_formula}", 2 * norm_count
        ),
        block_attention=_sum_of(
            "attention (c_attn, c_proj)", _linear(width, 3 * width, bias), _linear(width, width, bias)
        ),
        block_mlp=_sum_of(
            "MLP (c_fc, c_proj)", _linear(width, config.n_inner, bias), _linear(config.n_inner, width, bias)
        ),
        n_layer=config.n_layer,
        final_norm=Component("final norm (ln_f)", norm_formula, norm_count),
        head=head,
    )


def _in_words(count: int) -> str:
    for size, word in ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand")):
        if count >= size:
            return f"{count / size:.1f} {word}"
    return str(count)


def format_parameter_table(counted: ParameterCount) -> str:
    """The breakdown as aligned text: each component with the formula behind its size."""
    rows = [
        (counted.token_embedding.name, f"{counted.token_embedding.formula} = {counted.token_embedding.count:,}"),
        (counted.position_embedding.name,
         f"{counted.position_embedding.formula} = {counted.position_embedding.count:,}"),
        ("per block:", ""),
        *(
            (f"  {part.name}", f"{part.formula} = {part.count:,}")
            for part in (counted.block_layer_norms, counted.block_attention, counted.block_mlp)
        ),
        ("  block total", f"{counted.per_block:,}"),
        (f"{counted.n_layer} blocks", f"{counted.n_layer} x {counted.per_block:,} = {counted.blocks:,}"),
        (counted.final_norm.name, f"{counted.final_norm.formula} = {counted.final_norm.count:,}"),
        (counted.head.name, f"{counted.head.formula} = {counted.head.count:,}"),
        ("total", f"{counted.total:,} ({_in_words(counted.total)})"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name:<{width}}{value}".rstrip() for name, value in rows)


def _looks_like_local_path(model: str) -> bool:
    # Hub ids are `name` or `owner/name`; anything else that does not exist is a mistyped directory.
    return Path(model).is_absolute() or model.startswith((".", "~")) or model.count("/") > 1


def _require_glade(config, source: str) -> None:
    if config.model_type != GladeConfig.model_type:
        raise ValueError(
            f"{source} holds a {config.model_type!r} model, not a Glade model (model_type 'glade'); "
            "convert GPT-2 checkpoints to Glade first"
        )


def checkpoint_config(model: str) -> GladeConfig:
    """The config of a Glade checkpoint directory, hub id or `tiny-random`, read without loading any weights."""
    if model == TINY_RANDOM:
        return tiny_config()
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a checkpoint directory: it has no config.json")
    if not path.exists() and _looks_like_local_path(model):
        raise FileNotFoundError(f"No checkpoint directory at {model}")
    if path.is_file():
        raise ValueError(f"{model} is a file; pass the checkpoint directory that holds config.json")
    config = AutoConfig.from_pretrained(str(path) if path.exists() else model)
    _require_glade(config, model)
    return config


def config_from_file(path: str) -> GladeConfig:
    """A GladeConfig from a config.json file (a checkpoint's, or hand-written with GladeConfig's fields)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"No config file at {path}")
    try:
        fields = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(fields, dict):
        raise ValueError(f"{path} must hold a JSON object of GladeConfig fields")
    model_type = fields.get("model_type", GladeConfig.model_type)
    if model_type != GladeConfig.model_type:
        raise ValueError(f"{path} describes a {model_type!r} model, not a Glade model (model_type 'glade')")
    return GladeConfig.from_dict(fields)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "params", help="count a Glade model's parameters by component, from its config (nothing is allocated)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=list(PRESETS), help="a named architecture, e.g. gpt2 or gpt3-175b")
    source.add_argument("--model", help=f"checkpoint dir or hub id (default: shipped model, else {TINY_RANDOM})")
    source.add_argument("--config", help="a config.json file")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    if args.preset:
        source, config = f"preset {args.preset}", GladeConfig.from_preset(args.preset)
    elif args.config:
        source, config = args.config, config_from_file(args.config)
    else:
        model = args.model or default_model()
        source, config = model, checkpoint_config(model)
    print(
        f"{source}: n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd:,}, "
        f"n_inner={config.n_inner:,}, vocab_size={config.vocab_size:,}, n_positions={config.n_positions:,}, "
        f"bias={config.bias}, tied head={config.tie_word_embeddings}\n"
    )
    print(format_parameter_table(count_parameters(config)))
