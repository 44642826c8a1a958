"""Where a Glade model's parameters live, computed from its config alone (`glade params` prints it).

The count is a formula over the config, so even GPT-3 175B is broken down instantly without allocating it, and a
checkpoint's config can be checked against its saved weights before the model is built.
"""

from dataclasses import dataclass

from .configuration_glade import GladeConfig


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
    embedding_norm: Component
    block_layer_norms: Component
    block_attention: Component
    block_mlp: Component
    n_layer: int
    residual_lambdas: Component
    value_embeddings: Component
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
        embeddings = self.token_embedding.count + self.position_embedding.count + self.embedding_norm.count
        extras = self.residual_lambdas.count + self.value_embeddings.count
        return embeddings + self.blocks + extras + self.final_norm.count + self.head.count


def _linear(n_in: int, n_out: int, bias: bool) -> tuple[str, int]:
    if bias:
        return f"({n_in:,} x {n_out:,} + {n_out:,})", n_in * n_out + n_out
    return f"{n_in:,} x {n_out:,}", n_in * n_out


def _norm(width: int, config: GladeConfig) -> tuple[str, int]:
    """A LayerNorm's gain (and bias), or an RMSNorm's gain; nothing without gains."""
    if not config.norm_gain:
        return "0 (no gain)", 0
    if config.bias and config.norm == "layernorm":
        return f"{width:,} + {width:,}", 2 * width
    return f"{width:,}", width


def _twice(formula: str, count: int) -> str:
    if not count:
        return formula
    return f"2 x ({formula})" if "+" in formula else f"2 x {formula}"


def _sum_of(name: str, *parts: tuple[str, int]) -> Component:
    return Component(name, " + ".join(formula for formula, _ in parts), sum(count for _, count in parts))


def _attention(config: GladeConfig) -> Component:
    width, bias, head_dim = config.n_embd, config.bias, config.n_embd // config.n_head
    qkv = _linear(width, (config.n_head + 2 * config.n_kv_head) * head_dim, bias)
    if not config.qk_norm:
        return _sum_of("attention (c_attn, c_proj)", qkv, _linear(width, width, bias))
    qk_norms = (f"2 x {head_dim:,}", 2 * head_dim) if config.norm_gain else ("0 (no gain)", 0)
    return _sum_of("attention (c_attn, q_norm, k_norm, c_proj)", qkv, qk_norms, _linear(width, width, bias))


def _mlp(config: GladeConfig) -> Component:
    width, inner, bias = config.n_embd, config.n_inner, config.bias
    if config.activation_function == "swiglu":
        return _sum_of("MLP (c_gate, c_fc, c_proj)", _linear(width, inner, bias), _linear(width, inner, bias),
                       _linear(inner, width, bias))
    return _sum_of("MLP (c_fc, c_proj)", _linear(width, inner, bias), _linear(inner, width, bias))


def _value_embeddings(config: GladeConfig) -> Component:
    """The tables of the blocks with value embeddings, and their gates (kept apart from the per-block components:
    only every other block has them)."""
    layers = len(config.value_embedding_layers)
    if not layers:
        return Component("value embeddings", "none", 0)
    kv_size = config.n_kv_head * (config.n_embd // config.n_head)
    (table, table_count), (gate, gate_count) = (
        _linear(config.vocab_size, kv_size, bias=False),
        _linear(config.value_gate_channels, config.n_kv_head, bias=False),
    )
    return Component("value embeddings (value_embeds, attn.ve_gate)", f"{layers} x ({table} + {gate})",
                     layers * (table_count + gate_count))


def count_parameters(config: GladeConfig) -> ParameterCount:
    """Count the parameters a `GladeForCausalLM` built from `config` has, without building it."""
    width = config.n_embd
    norm_formula, norm_count = _norm(width, config)
    if config.tie_word_embeddings:
        head = Component("head (lm_head)", "tied to wte", 0)
    else:
        head = Component("head (lm_head)", *_linear(width, config.vocab_size, bias=False))
    if config.positions == "rotary":
        positions = Component("positions (rotary)", "computed, not learned", 0)
    else:
        positions = Component(
            "position embedding (wpe)", f"{config.n_positions:,} x {width:,}", config.n_positions * width
        )
    return ParameterCount(
        token_embedding=Component(
            "token embedding (wte)", f"{config.vocab_size:,} x {width:,}", config.vocab_size * width
        ),
        position_embedding=positions,
        embedding_norm=Component("embedding norm (ln_emb)", norm_formula, norm_count) if config.embedding_norm
        else Component("embedding norm", "none", 0),
        block_layer_norms=Component(
            f"norms (ln_1, ln_2: {config.norm})",
            _twice(norm_formula, norm_count),
            2 * norm_count,
        ),
        block_attention=_attention(config),
        block_mlp=_mlp(config),
        n_layer=config.n_layer,
        residual_lambdas=Component("residual lambdas (resid, x0)", f"2 x {config.n_layer}", 2 * config.n_layer)
        if config.residual_lambdas else Component("residual lambdas", "none", 0),
        value_embeddings=_value_embeddings(config),
        final_norm=Component("final norm (ln_f)", norm_formula, norm_count),
        head=head,
    )


def format_count(count: int) -> str:
    """A count as people say it: 6.9M, 124.4M, 175.0B."""
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= size:
            return f"{count / size:.1f}{suffix}"
    return str(count)


def format_parameter_table(counted: ParameterCount) -> str:
    """The breakdown as aligned text: each component with the formula behind its size."""
    rows = [
        (counted.token_embedding.name, f"{counted.token_embedding.formula} = {counted.token_embedding.count:,}"),
        (counted.position_embedding.name,
         f"{counted.position_embedding.formula} = {counted.position_embedding.count:,}"),
        *(
            [(counted.embedding_norm.name, f"{counted.embedding_norm.formula} = {counted.embedding_norm.count:,}")]
            if counted.embedding_norm.formula != "none" else []
        ),
        ("per block:", ""),
        *(
            (f"  {part.name}", f"{part.formula} = {part.count:,}")
            for part in (counted.block_layer_norms, counted.block_attention, counted.block_mlp)
        ),
        ("  block total", f"{counted.per_block:,}"),
        (f"{counted.n_layer} blocks", f"{counted.n_layer} x {counted.per_block:,} = {counted.blocks:,}"),
        *(
            (part.name, f"{part.formula} = {part.count:,}")
            for part in (counted.residual_lambdas, counted.value_embeddings) if part.count
        ),
        (counted.final_norm.name, f"{counted.final_norm.formula} = {counted.final_norm.count:,}"),
        (counted.head.name, f"{counted.head.formula} = {counted.head.count:,}"),
        ("total", f"{counted.total:,} ({format_count(counted.total)})"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name:<{width}}{value}".rstrip() for name, value in rows)
