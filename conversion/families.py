"""The export families: the stock model families a Glade checkpoint can be written as, in one table (`FAMILIES`).

| family | picked by | stock class | llama.cpp architecture (GGUF) |
| --- | --- | --- | --- |
| `gpt2` | learned positions | `GPT2LMHeadModel` | `gpt2` |
| `gpt_neox` | rotary positions, LayerNorm | `GPTNeoXForCausalLM` (sequential residual) | `gptneox` |
| `llama` | rotary positions, RMSNorm, no QK-norm | `LlamaForCausalLM` | `llama` |
| `qwen3` | rotary positions, RMSNorm, QK-norm | `Qwen3ForCausalLM` | `qwen3` |
| `nanochat` | rotary positions, RMSNorm without gains, QK-norm, embedding norm | `NanoChatForCausalLM` | none |

An entry says which GladeConfig values its family computes (`expresses`, field by field), which of those fields pick
it (`picked_by`), how its stock transformers config is built, and which llama.cpp architecture it is written as, with
the hyperparameters llama.cpp reads and the values llama.cpp's graph computes fewer of than the stock class. Its tensor
maps are pure functions over state dicts (state_dict.py). `family_for` picks the family of a config (the most specific
one its values fit); the family then refuses, with the options named, every value it does not compute. stock.py,
gpt2.py and gguf.py read this table: a new family is one entry here (with its config builder and hyperparameter
writer, when no existing one fits) and its two tensor maps in state_dict.py. RoPE settings are options too, read
from `rope_parameters` (`rope_type`, `partial_rotary_factor`; `None` for learned positions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    NanoChatConfig,
    NanoChatForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from glade import GladeConfig

from .state_dict import (
    StateDict,
    glade_to_gguf_gpt2,
    glade_to_gguf_gpt_neox,
    glade_to_gguf_llama,
    glade_to_gguf_nemotron,
    glade_to_gpt2,
    glade_to_gpt_neox,
    glade_to_llama,
    glade_to_nanochat,
)

if TYPE_CHECKING:  # the gguf library loads only when a GGUF file is written
    from gguf import GGUFWriter

# The values of one GladeConfig field that a target computes: a tuple, or a function of the config where the values
# depend on another field.
Values = tuple[Any, ...] | Callable[[GladeConfig], tuple[Any, ...]]
# GladeConfig field -> its values that a target computes; fields it does not name may take any value.
Expresses = Mapping[str, Values]


def without_grouped_query_attention(config: GladeConfig) -> tuple[int]:
    """n_kv_head's one value for a target that has a key/value head per query head."""
    return (config.n_head,)


# Options that live inside a field rather than being one: RoPE's, read from `rope_parameters`.
ROPE_OPTIONS: dict[str, Callable[[GladeConfig], Any]] = {
    "rope_type": lambda config: config.rope_parameters.get("rope_type", "default"),
    "partial_rotary_factor": lambda config: config.rope_parameters.get("partial_rotary_factor", 1.0),
}
# Every rope_type transformers' rotary embeddings (Llama's, GPT-NeoX's, Qwen3's, NanoChat's) compute.
TRANSFORMERS_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# The ones llama.cpp's graphs compute as transformers does (a linear factor scales every position).
LLAMA_CPP_ROPE_TYPES = ("default", "linear")


def option_value(config: GladeConfig, name: str) -> Any:
    if name in ROPE_OPTIONS:
        return ROPE_OPTIONS[name](config) if hasattr(config, "rope_parameters") else None
    return getattr(config, name)


def unexpressed(config: GladeConfig, expresses: Expresses) -> dict[str, Any]:
    """The options of `config` outside `expresses`, by field name, in the order `expresses` lists them."""
    options = {}
    for name, values in expresses.items():
        allowed = values(config) if callable(values) else values
        if option_value(config, name) not in allowed:
            options[name] = option_value(config, name)
    return options


def check_expressible(config: GladeConfig, expresses: Expresses, target: str) -> None:
    """Raise a ValueError naming every option of `config` that `target` cannot express."""
    if options := unexpressed(config, expresses):
        named = ", ".join(f"{name}={value!r}" for name, value in options.items())
        raise ValueError(f"Glade config uses {named}, which {target} cannot express")


@dataclass(frozen=True)
class GGUFArchitecture:
    """The llama.cpp architecture a family is written as in a GGUF file."""

    # Its name in gguf.MODEL_ARCH_NAMES, which prefixes its hyperparameter keys (`gpt2.context_length`).
    arch: str
    # Writes the `{arch}.*` hyperparameters llama.cpp reads.
    add_hparams: Callable[[GGUFWriter, GladeConfig], None]
    # Glade's tensors under the Hugging Face names gguf's tensor map knows for `arch`, without tensors llama.cpp
    # derives.
    tensors: Callable[[StateDict, GladeConfig], StateDict]
    # Fields whose values llama.cpp's graph computes fewer of than the stock class: they replace the family's own.
    narrows: Expresses = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"llama.cpp's {self.arch} architecture"


@dataclass(frozen=True)
class ExportFamily:
    """A stock model family, seen from a Glade checkpoint."""

    model_class: type[PreTrainedModel]
    # Every field whose values are not all computed, with the values that are.
    expresses: Expresses
    # The fields of `expresses` whose values pick this family. Where two families' values both fit a config, the
    # one picked by more fields takes it; two picked by as many fields must not share a config.
    picked_by: tuple[str, ...]
    # The stock config computing what a Glade config (one this family expresses) computes.
    build_config: Callable[[GladeConfig], PreTrainedConfig]
    # Glade's tensors as `model_class` names and lays them out.
    stock_tensors: Callable[[StateDict, GladeConfig], StateDict]
    # None: no llama.cpp architecture computes the family's options together; `gguf_refusal` names them.
    gguf: GGUFArchitecture | None
    # The class's name in messages, when not its class name.
    label: str = ""
    gguf_refusal: tuple[str, ...] = ()
    # llama.cpp architectures for the configs of this family that `gguf` does not compute, tried in order.
    gguf_alternatives: tuple[GGUFArchitecture, ...] = ()

    @property
    def target(self) -> str:
        return self.label or self.model_class.__name__

    def picks(self, config: GladeConfig) -> bool:
        return not unexpressed(config, {name: self.expresses[name] for name in self.picked_by})

    def stock_config(self, config: GladeConfig) -> PreTrainedConfig:
        """The stock config computing what `config` computes, or a ValueError naming what the family cannot."""
        check_expressible(config, self.expresses, self.target)
        return self.build_config(config)

    def gguf_architecture(self, config: GladeConfig) -> GGUFArchitecture:
        """The llama.cpp architecture computing `config`, or a ValueError naming what the family's own does not."""
        if self.gguf is None:
            named = ", ".join(f"{name}={option_value(config, name)!r}" for name in self.gguf_refusal)
            raise ValueError(f"Glade config uses {named}, which no llama.cpp architecture computes together")
        fitting = [architecture for architecture in (self.gguf, *self.gguf_alternatives)
                   if not unexpressed(config, {**self.expresses, **architecture.narrows})]
        if not fitting:  # named by what the family's own architecture does not compute
            check_expressible(config, {**self.expresses, **self.gguf.narrows}, self.gguf.target)
        return fitting[0]


def family_for(config: GladeConfig) -> ExportFamily:
    """The most specific family (the longest `picked_by`) that `config`'s values pick, whether or not it computes the
    rest (that is the family's own check), or a ValueError naming the picking options no family has."""
    if picking := [family for family in FAMILIES.values() if family.picks(config)]:
        # Most specific first, so that a new family can take configs from a broader one without editing its entry.
        return max(picking, key=lambda family: len(family.picked_by))
    deciding = dict.fromkeys(name for family in FAMILIES.values() for name in family.picked_by)
    # A value no family picks by is named alone; values that each pick some family, but never together, all are.
    nowhere = [
        name
        for name in deciding
        if all(name in unexpressed(config, f.expresses) for f in FAMILIES.values() if name in f.expresses)
    ]
    named = ", ".join(f"{name}={option_value(config, name)!r}" for name in nowhere or deciding)
    raise ValueError(f"Glade config uses {named}, which no export family ({', '.join(FAMILIES)}) expresses")


# --- Stock configs ---

# Glade activation names GPT-2's config takes as they are.
GPT2_ACTIVATIONS = ("gelu_new", "gelu")
# Fields with the same name and meaning in GladeConfig and GPT2Config.
GPT2_SHARED_FIELDS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "layer_norm_epsilon",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)
# Glade's MLP activations -> GPT-NeoX's `hidden_act`. gelu_pytorch_tanh is torch's tanh-approximate GELU, the kernel
# Glade's gelu_new runs; transformers' "gelu_new" writes the same formula out in Python and rounds differently.
GPT_NEOX_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh", "gelu": "gelu", "relu2": "relu2"}


def gpt2_config(config: GladeConfig) -> GPT2Config:
    return GPT2Config(
        **{name: getattr(config, name) for name in GPT2_SHARED_FIELDS},
        activation_function=config.activation_function,
        architectures=["GPT2LMHeadModel"],
        # GPT-2's original name for n_positions: transformers 5 no longer writes it, llama.cpp's converter reads it.
        n_ctx=config.n_positions,
    )


def gpt_neox_config(config: GladeConfig) -> GPTNeoXConfig:
    stock = GPTNeoXConfig(
        **_shared_fields(config),
        rope_parameters=dict(config.rope_parameters),
        hidden_act=GPT_NEOX_ACTIVATIONS[config.activation_function],
        hidden_dropout=config.resid_pdrop,
        layer_norm_eps=config.layer_norm_epsilon,
        use_parallel_residual=False,
        attention_bias=True,
    )
    # transformers 5 writes only rope_parameters; transformers 4 and llama.cpp's converter read these names.
    stock.rotary_pct = option_value(config, "partial_rotary_factor")
    stock.rotary_emb_base = config.rope_parameters["rope_theta"]
    return stock


def llama_config(config: GladeConfig) -> LlamaConfig:
    return _with_rope_theta(LlamaConfig(**_llama_fields(config), mlp_bias=config.bias))


def qwen3_config(config: GladeConfig) -> Qwen3Config:
    return _with_rope_theta(Qwen3Config(**_llama_fields(config)))


def nanochat_config(config: GladeConfig) -> NanoChatConfig:
    return _with_rope_theta(NanoChatConfig(
        **_shared_fields(config),
        rope_parameters=dict(config.rope_parameters),
        num_key_value_heads=config.n_kv_head,
        hidden_act="relu2",
        rms_norm_eps=config.layer_norm_epsilon,
        final_logit_softcapping=config.logit_softcap,
    ))


def _shared_fields(config: GladeConfig) -> dict[str, Any]:
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.n_inner,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        max_position_embeddings=config.n_positions,
        attention_dropout=config.attn_pdrop,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=config.use_cache,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def _llama_fields(config: GladeConfig) -> dict[str, Any]:
    return dict(
        **_shared_fields(config),
        rope_parameters=dict(config.rope_parameters),
        num_key_value_heads=config.n_kv_head,
        head_dim=config.n_embd // config.n_head,
        hidden_act="silu",
        rms_norm_eps=config.layer_norm_epsilon,
        attention_bias=config.bias,
    )


def _with_rope_theta(stock: PreTrainedConfig) -> PreTrainedConfig:
    # transformers 5 writes only rope_parameters; transformers 4 (and servers pinned to it) read rope_theta.
    stock.rope_theta = stock.rope_parameters["rope_theta"]
    return stock


# --- GGUF hyperparameters ---


def add_shared_hparams(writer: GGUFWriter, config: GladeConfig) -> None:
    """The `{arch}.*` shape every llama.cpp architecture reads."""
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)


def add_rope_hparams(writer: GGUFWriter, config: GladeConfig) -> None:
    """The rotation: its width, base and linear scaling (the one scaling LLAMA_CPP_ROPE_TYPES allows)."""
    from gguf import RopeScalingType

    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if option_value(config, "rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_parameters["factor"])


def add_gpt2_hparams(writer: GGUFWriter, config: GladeConfig) -> None:
    add_shared_hparams(writer, config)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def add_llama_hparams(writer: GGUFWriter, config: GladeConfig) -> None:
    add_shared_hparams(writer, config)
    writer.add_head_count_kv(config.n_kv_head)
    # Readers of Qwen3 files take the head width from the key/value lengths, with a default that is not ours.
    writer.add_key_length(config.n_embd // config.n_head)
    writer.add_value_length(config.n_embd // config.n_head)
    add_rope_hparams(writer, config)
    writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    writer.add_vocab_size(config.vocab_size)


def add_nemotron_hparams(writer: GGUFWriter, config: GladeConfig) -> None:
    add_shared_hparams(writer, config)
    writer.add_head_count_kv(config.n_kv_head)
    add_rope_hparams(writer, config)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_vocab_size(config.vocab_size)


def add_gpt_neox_hparams(writer: GGUFWriter, config: GladeConfig) -> None:
    add_shared_hparams(writer, config)
    add_rope_hparams(writer, config)
    writer.add_parallel_residual(False)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


# --- The table ---

# llama.cpp's gpt2 and gptneox graphs hard-code the tanh-approximated GELU, whatever the stock class allows.
TANH_GELU_ONLY = {"activation_function": ("gelu_new",)}
# Only nanochat's family normalises the embeddings and has norms without gains.
GAINED_NORMS = {"norm_gain": (True,), "embedding_norm": (False,)}
# No stock family mixes the embeddings back into each block's input, or adds value embeddings.
PLAIN_RESIDUALS = {"residual_lambdas": (False,), "value_embeddings": (False,)}
LLAMA_EXPRESSES = {
    "positions": ("rotary",),
    "norm": ("rmsnorm",),
    "qk_norm": (False,),
    "activation_function": ("swiglu",),
    "logit_softcap": (None,),
    **GAINED_NORMS,
    **PLAIN_RESIDUALS,
    "rope_type": TRANSFORMERS_ROPE_TYPES,
    "partial_rotary_factor": (1.0,),  # Llama and Qwen3 rotate every channel of a head
}
# llama.cpp's llama and qwen3 graphs: no partial rotation (as the stock classes), linear scaling only.
LLAMA_CPP_ROTATION = {"rope_type": LLAMA_CPP_ROPE_TYPES}

# Keyed by the stock class's model_type. No family computes logit soft-capping.
FAMILIES: dict[str, ExportFamily] = {
    "gpt2": ExportFamily(
        GPT2LMHeadModel,
        expresses={
            "positions": ("learned",),
            "norm": ("layernorm",),
            "qk_norm": (False,),
            "activation_function": GPT2_ACTIVATIONS,
            "logit_softcap": (None,),
            "bias": (True,),  # its Conv1D projections and LayerNorms always carry biases
            "n_kv_head": without_grouped_query_attention,
            **GAINED_NORMS,
            **PLAIN_RESIDUALS,
        },
        picked_by=("positions",),
        build_config=gpt2_config,
        stock_tensors=glade_to_gpt2,
        gguf=GGUFArchitecture("gpt2", add_gpt2_hparams, glade_to_gguf_gpt2, narrows=TANH_GELU_ONLY),
        label="GPT-2",
    ),
    "gpt_neox": ExportFamily(
        GPTNeoXForCausalLM,
        expresses={
            "positions": ("rotary",),
            "norm": ("layernorm",),
            "qk_norm": (False,),
            "activation_function": tuple(GPT_NEOX_ACTIVATIONS),
            "logit_softcap": (None,),
            "bias": (True,),  # its LayerNorms and MLP always carry biases
            "n_kv_head": without_grouped_query_attention,
            **GAINED_NORMS,
            **PLAIN_RESIDUALS,
            "rope_type": TRANSFORMERS_ROPE_TYPES,  # and any partial_rotary_factor, which GPT-NeoX introduced
        },
        picked_by=("positions", "norm"),
        build_config=gpt_neox_config,
        stock_tensors=glade_to_gpt_neox,
        gguf=GGUFArchitecture(
            "gptneox", add_gpt_neox_hparams, glade_to_gguf_gpt_neox,
            narrows={**TANH_GELU_ONLY, "rope_type": LLAMA_CPP_ROPE_TYPES},
        ),
        # llama.cpp's nemotron is GPT-NeoX's layout with a squared-ReLU MLP (its LayerNorm1p is a LayerNorm there).
        gguf_alternatives=(
            GGUFArchitecture(
                "nemotron", add_nemotron_hparams, glade_to_gguf_nemotron,
                narrows={"activation_function": ("relu2",), "rope_type": LLAMA_CPP_ROPE_TYPES},
            ),
        ),
    ),
    "llama": ExportFamily(
        LlamaForCausalLM,
        expresses=LLAMA_EXPRESSES,  # with or without biases and grouped-query attention
        picked_by=("positions", "norm", "qk_norm"),
        build_config=llama_config,
        stock_tensors=glade_to_llama,
        gguf=GGUFArchitecture("llama", add_llama_hparams, glade_to_gguf_llama, narrows=LLAMA_CPP_ROTATION),
    ),
    "qwen3": ExportFamily(
        Qwen3ForCausalLM,
        expresses={**LLAMA_EXPRESSES, "qk_norm": (True,), "bias": (False,)},  # its MLP has no biases
        picked_by=("positions", "norm", "qk_norm"),
        build_config=qwen3_config,
        stock_tensors=glade_to_llama,
        # llama.cpp's qwen3 rotates each head's two halves, as transformers does: its tensors are Qwen3's, in order.
        gguf=GGUFArchitecture("qwen3", add_llama_hparams, glade_to_llama, narrows=LLAMA_CPP_ROTATION),
    ),
    "nanochat": ExportFamily(
        NanoChatForCausalLM,
        expresses={
            "positions": ("rotary",),
            "norm": ("rmsnorm",),
            "norm_gain": (False,),
            "embedding_norm": (True,),
            "qk_norm": (True,),
            "activation_function": ("relu2",),
            "bias": (False,),
            "tie_word_embeddings": (False,),
            **PLAIN_RESIDUALS,
            "rope_type": TRANSFORMERS_ROPE_TYPES,
            "partial_rotary_factor": (1.0,),
        },  # with any soft cap and grouped-query attention
        picked_by=("positions", "norm", "qk_norm", "norm_gain", "embedding_norm"),
        build_config=nanochat_config,
        stock_tensors=glade_to_nanochat,
        # gemma2 has soft-capping and nemotron a non-gated squared ReLU, but no llama.cpp graph normalises the
        # embeddings, or has either of those with QK-norm.
        gguf=None,
        gguf_refusal=("embedding_norm", "qk_norm", "activation_function", "logit_softcap"),
    ),
}
