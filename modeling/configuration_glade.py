"""Glade configuration: GPT-2's hyperparameters under GPT-2's stored names, plus the options of modern GPTs.

Every modern option is off by default, so a default `GladeConfig` is GPT-2 exactly.

This file ships beside `modeling_glade.py` as Hub remote code, so it imports only the standard library and
transformers.
"""

import math
from typing import Any

from transformers import PreTrainedConfig

ACTIVATION_FUNCTIONS = ("gelu_new", "gelu", "relu2", "swiglu")
POSITIONS = ("learned", "rotary")
NORMS = ("layernorm", "rmsnorm")

# Architectures (shapes, and for -modern the measured recipe): the vocabulary of a trained model comes from its
# tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    "glade-tiny": {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 256, "vocab_size": 8192},
    "glade-small": {"n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 512, "vocab_size": 8192},
    "glade-base": {"n_layer": 8, "n_head": 8, "n_embd": 512, "n_positions": 512, "vocab_size": 8192},
    # glade-small with the architecture options that lowered the loss in docs/recipe.md's ablation (train it with
    # `glade pretrain --optimizer muon`, the other half of the recipe).
    "glade-small-modern": {
        "n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 512, "vocab_size": 8192, "positions": "rotary",
    },
    # nanochat's architecture (Karpathy, 2025) at its d20 shape, as transformers' NanoChatForCausalLM computes it:
    # norms without gains (the embeddings normalised too), QK-norm after the rotation, squared ReLU, no biases, an
    # untied head and logits soft-capped at 15. `glade export stock` writes it as that class.
    "nanochat": {
        "n_layer": 20, "n_head": 10, "n_embd": 1280, "n_positions": 2048, "vocab_size": 65536,
        "positions": "rotary", "norm": "rmsnorm", "norm_gain": False, "embedding_norm": True, "qk_norm": True,
        "activation_function": "relu2", "bias": False, "tie_word_embeddings": False, "logit_softcap": 15.0,
        "layer_norm_epsilon": 1e-6, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    },
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},
    # GPT-3 (Brown et al. 2020, table 2.1). Two rows of that table do not multiply out: 1.3B lists 24 heads of 128
    # for d_model=2048, and 13B lists d_model=5140 for 40 heads of 128. We keep d_head=128 and d_model as the
    # parameter counts require (16 heads; 5120). Head count does not change the number of parameters.
    "gpt3-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 2048},
    "gpt3-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "n_positions": 2048},
    "gpt3-large": {"n_layer": 24, "n_head": 16, "n_embd": 1536, "n_positions": 2048},
    "gpt3-xl": {"n_layer": 24, "n_head": 16, "n_embd": 2048, "n_positions": 2048},
    "gpt3-2.7b": {"n_layer": 32, "n_head": 32, "n_embd": 2560, "n_positions": 2048},
    "gpt3-6.7b": {"n_layer": 32, "n_head": 32, "n_embd": 4096, "n_positions": 2048},
    "gpt3-13b": {"n_layer": 40, "n_head": 40, "n_embd": 5120, "n_positions": 2048},
    "gpt3-175b": {"n_layer": 96, "n_head": 96, "n_embd": 12288, "n_positions": 2048},
}


# nanochat's gate reads the first 32 channels of the block's input: enough to modulate, cheap to compute.
VALUE_GATE_CHANNELS = 32


class GladeConfig(PreTrainedConfig):
    r"""
    Configuration of a Glade model. Defaults reproduce GPT-2 124M.

    Args:
        vocab_size: number of token ids.
        n_positions: longest sequence the learned position table covers.
        n_embd, n_layer, n_head: width, depth and attention heads (`n_embd` must divide by `n_head`).
        n_inner: MLP width; `None` means 4 * n_embd, or for `"swiglu"` 8/3 * n_embd rounded up to a multiple of 32
            (three matrices of that width hold as many parameters as GPT-2's two of 4 * n_embd).
        activation_function: `"gelu_new"` (GPT-2's tanh approximation), `"gelu"` (exact, as in nanoGPT), `"relu2"`
            (squared ReLU) or `"swiglu"` (a gated MLP: silu(x W_gate) * (x W_fc), then W_proj).
        resid_pdrop, embd_pdrop, attn_pdrop: dropout probabilities, in [0, 1).
        layer_norm_epsilon: LayerNorm epsilon.
        initializer_range: std of the normal init; residual projections get std / sqrt(2 * n_layer).
        bias: whether Linear layers and LayerNorms carry biases (GPT-2: True; nanoGPT can turn them off).
        bos_token_id, eos_token_id, pad_token_id: special ids; when bos and eos are both unset they default to
            the last id, where GPT-2 and Glade tokenizers keep `<|endoftext|>`.
        tie_word_embeddings: share the token embedding with the output head.
        positions: `"learned"` (GPT-2's position table) or `"rotary"` (RoPE on queries and keys, no table).
        rope_parameters: for rotary positions, transformers' RoPE dict: `rope_theta`, `rope_type` (any of
            transformers' `ROPE_INIT_FUNCTIONS`: default, linear, dynamic, yarn, longrope, llama3, with their own
            keys) and `partial_rotary_factor` (the fraction of each head's channels that rotate; default 1.0). A
            learned-position config has no `rope_parameters` attribute at all.
        norm: `"layernorm"` (GPT-2) or `"rmsnorm"` (no mean subtraction, no bias).
        norm_gain: whether the norms (blocks, final, QK) carry a learned gain; nanochat's have none.
        embedding_norm: normalise the token embeddings before the first block (nanochat).
        qk_norm: RMSNorm on each head's queries and keys: before RoPE with a gain (Qwen3), after it without one
            (nanochat; the two orders are the same function when the norm has no gain).
        n_kv_head: key/value heads (grouped-query attention); must divide `n_head`. `None` means `n_head`.
        logit_softcap: soft-cap the logits to `c * tanh(logits / c)`; `None` leaves them as they are. Also read and
            written as `final_logit_softcapping`, the name Gemma 2, NanoChat and vLLM's transformers backend use.
        zero_init: start every residual-output projection (and an untied output head) at zero, so each block begins
            as the identity and the first logits are uniform.
        residual_lambdas: two learned scalars per block mix its input from the residual stream and the embeddings
            (x = resid_lambdas[i] * x + x0_lambdas[i] * x0), as nanochat and modded-nanogpt do; they start at 1 and 0,
            where the model is a plain transformer.
        value_embeddings: ResFormer-style value embeddings (nanochat): every other block, ending with the last, adds
            a learned embedding of each token to its attention values, scaled per key/value head by a gate
            2 sigmoid(W x[:32]) that starts at 1. The model then reads `input_ids`, not `inputs_embeds`.
    """

    model_type = "glade"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
        "intermediate_size": "n_inner",
        "num_key_value_heads": "n_kv_head",
        "final_logit_softcapping": "logit_softcap",
    }
    # The token embedding is split by vocabulary as the head it is tied to is (each rank holds the same rows of the
    # shared weight). The fused q|k|v weight cannot be split column-wise as three separate projections would be, so
    # attention runs whole on every rank and its output projection splits that replicated input itself.
    base_model_tp_plan = {
        "wte": "embedding_rowwise",
        "h.*.attn.c_proj": "rowwise_split_input",
        "h.*.mlp.c_fc": "colwise",
        "h.*.mlp.c_gate": "colwise",
        "h.*.mlp.c_proj": "rowwise",
    }
    # FSDP2 units: one per block. The token embedding stays in the root unit with the head it is tied to.
    base_model_fsdp_plan = {"h.*": "free_full_weight", "ln_f": "keep_full_weight"}
    base_model_pp_plan = {
        "wte": (["input_ids"], ["inputs_embeds"]),
        "h": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "ln_f": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bias: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    positions: str = "learned"
    norm: str = "layernorm"
    norm_gain: bool = True
    embedding_norm: bool = False
    qk_norm: bool = False
    n_kv_head: int | None = None
    logit_softcap: float | None = None
    zero_init: bool = False
    residual_lambdas: bool = False
    value_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # Canonical names (hidden_size=..., num_attention_heads=...) arrive in kwargs: set them before the defaults
        # that depend on them.
        for canonical, stored in self.attribute_map.items():
            if canonical in kwargs:
                setattr(self, stored, kwargs.pop(canonical))
        self._check_types()
        if self.n_inner is None:
            self.n_inner = swiglu_width(self.n_embd) if self.activation_function == "swiglu" else 4 * self.n_embd
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.bos_token_id is None and self.eos_token_id is None:
            self.bos_token_id = self.eos_token_id = self.vocab_size - 1
        self._take_rope_parameters(kwargs)
        super().__post_init__(**kwargs)  # standardizes rope_parameters, where the config has them
        if self.activation_function != "swiglu":
            # Only the modules this config builds: transformers refuses a plan entry that matches no parameter.
            self.base_model_tp_plan = {
                module: style for module, style in type(self).base_model_tp_plan.items() if ".c_gate" not in module
            }
        self.validate_architecture()
        self.validate_token_ids()

    def _take_rope_parameters(self, kwargs: dict[str, Any]) -> None:
        # Only a rotary config has the attribute: transformers (and its common tests) take `hasattr(config,
        # "rope_parameters")` to mean the model rotates. Configs saved before this rule carry `null`.
        rope_parameters = kwargs.pop("rope_parameters", None)
        legacy = {key: kwargs[key] for key in ("rope_scaling", "rope_theta") if kwargs.get(key) is not None}
        if self.positions != "rotary":
            if rope_parameters is not None or legacy:
                raise ValueError(
                    f"GladeConfig.rope_parameters applies to positions='rotary', not {self.positions!r}: learned "
                    "positions have no rotation to scale"
                )
            return
        self.rope_parameters = rope_parameters
        # transformers standardizes the dict in super().__post_init__; the rotary share is Glade's own default.
        if isinstance(rope_parameters, dict):
            rope_parameters.setdefault("partial_rotary_factor", 1.0)
        elif rope_parameters is None and not legacy:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that rotate: head_dim * partial_rotary_factor."""
        factor = self.rope_parameters.get("partial_rotary_factor", 1.0)
        return int(self.n_embd // self.n_head * factor)

    @property
    def value_embedding_layers(self) -> tuple[int, ...]:
        """The blocks with a value embedding: every other one, ending with the last (none without the option)."""
        if not self.value_embeddings:
            return ()
        return tuple(range((self.n_layer - 1) % 2, self.n_layer, 2))

    @property
    def value_gate_channels(self) -> int:
        """The leading channels of a block's normalised input that its value-embedding gate reads."""
        return min(VALUE_GATE_CHANNELS, self.n_embd)

    @property
    def context_length(self) -> int:
        """The longest sequence the model is meant to read: n_positions, times a RoPE scaling factor where one is
        set (rotary positions have no table to run out of; a learned table ends at n_positions)."""
        if self.positions != "rotary":
            return self.n_positions
        return int(self.n_positions * self.rope_parameters.get("factor", 1.0))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GladeConfig":
        """A config from a named shape (`gpt2`, `glade-small`, `gpt3-175b`, ...), with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def _check_types(self) -> None:
        int_fields = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        for name in int_fields + ("n_inner", "n_kv_head"):
            value = getattr(self, name)
            if value is None and name in ("n_inner", "n_kv_head"):
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"GladeConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"GladeConfig.{name} must be a number, got {value!r} ({type(value).__name__})")
            # NaN fails no comparison, so the range checks below would let it through.
            if not math.isfinite(value):
                raise ValueError(f"GladeConfig.{name} must be a finite number, got {value}")
        for name in (
            "bias", "tie_word_embeddings", "qk_norm", "zero_init", "norm_gain", "embedding_norm", "residual_lambdas",
            "value_embeddings",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GladeConfig.{name} must be a bool, got {getattr(self, name)!r}")
        cap = self.logit_softcap
        if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool) or not 0 < cap < math.inf):
            raise ValueError(f"GladeConfig.logit_softcap must be a positive number or None, got {cap!r}")
        for name, choices in (("positions", POSITIONS), ("norm", NORMS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"GladeConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")

    def validate_architecture(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "n_kv_head"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GladeConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GladeConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd / n_head channels"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"GladeConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}): each key/value head "
                "serves the same number of query heads"
            )
        if self.positions == "rotary":
            self._check_rope_parameters()
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"GladeConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"GladeConfig.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}")
        if self.initializer_range < 0:
            raise ValueError(f"GladeConfig.initializer_range must be >= 0, got {self.initializer_range}")
        if self.activation_function not in ACTIVATION_FUNCTIONS:
            raise ValueError(
                f"GladeConfig.activation_function must be one of {ACTIVATION_FUNCTIONS}, "
                f"got {self.activation_function!r}"
            )

    def _check_rope_parameters(self) -> None:
        theta = self.rope_parameters.get("rope_theta")
        if not (isinstance(theta, (int, float)) and not isinstance(theta, bool) and 0 < theta < math.inf):
            raise ValueError(
                f"GladeConfig.rope_parameters['rope_theta'] must be a positive finite number, got {theta!r}"
            )
        factor = self.rope_parameters.get("partial_rotary_factor", 1.0)
        if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0 < factor <= 1):
            raise ValueError(
                f"GladeConfig.rope_parameters['partial_rotary_factor'] must be in (0, 1], got {factor!r}"
            )
        if self.rotary_dim < 2 or self.rotary_dim % 2 != 0:
            raise ValueError(
                f"GladeConfig.positions='rotary' needs an even, non-zero number of rotating channels per head, got "
                f"{self.rotary_dim} (n_embd / n_head = {self.n_embd // self.n_head}, partial_rotary_factor="
                f"{factor}): rotary embeddings rotate pairs of channels"
            )

    def validate_token_ids(self) -> None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            for token_id in ids:
                if token_id is None:
                    continue
                if not isinstance(token_id, int) or isinstance(token_id, bool):
                    raise ValueError(f"GladeConfig.{name} must be an int or None, got {token_id!r}")
                if not 0 <= token_id < self.vocab_size:
                    raise ValueError(
                        f"GladeConfig.{name}={token_id} is outside the vocabulary (vocab_size={self.vocab_size})"
                    )


def swiglu_width(n_embd: int) -> int:
    """The gated MLP's width: 8/3 * n_embd, rounded up to a multiple of 32 for matmul-friendly shapes."""
    return 32 * math.ceil(8 * n_embd / 3 / 32)


__all__ = ["GladeConfig", "PRESETS"]
