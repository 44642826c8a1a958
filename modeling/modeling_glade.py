"""Glade: the GPT-2 architecture as a transformers 5 model, with the options of modern GPTs.

tokens -> token embeddings (+ learned positions) -> n_layer x [norm -> attention ("tokens talk") -> residual,
norm -> MLP ("tokens think") -> residual] -> norm -> unembedding (tied to the embedding) -> logits.

A default `GladeConfig` is GPT-2 exactly. Parameter names follow GPT-2 (`transformer.h.0.attn.c_attn`, ...), but
projections are `nn.Linear`, so a GPT-2 checkpoint (whose `Conv1D` stores weights as in x out) converts by
transposing, never renaming. The options of modded-nanogpt and nanochat (rotary positions, RMSNorm, QK-norm, squared
ReLU, SwiGLU, grouped-query attention, logit soft-capping, zero-initialised projections) are config fields.

This file ships as Hub remote code: it imports only torch, transformers and its sibling files.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.integrations import use_kernel_forward_from_hub, use_kernelized_func
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_glade import GladeConfig
from .fast_generate import fast_generate
from .kernels_glade import causal_lm_loss_from_hidden, repeat_kv

logger = logging.get_logger(__name__)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3). Under torch.compile it is written as
    the same function x * sigmoid(2u), because inductor's CPU tanh is the slower of the two (forward + backward of a
    training step's activations took half the time); eager keeps torch's single fused kernel."""
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(math.sqrt(8 / math.pi) * (x + 0.044715 * x.pow(3)))
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": gelu_tanh,
    "gelu": F.gelu,
    "relu2": relu_squared,
}


@use_kernel_forward_from_hub("RMSNorm")
class GladeRMSNorm(nn.Module):
    """x / rms(x) * gain, computed in fp32 (as Llama's RMSNorm, so Glade and Llama agree to the bit)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GladeUnitRMSNorm(nn.Module):
    """x / rms(x) without a gain, computed in fp32 (as nanochat's, so the two agree to the bit)."""

    def __init__(self, eps: float):
        super().__init__()
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = hidden_states.float()
        return (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).type_as(
            hidden_states
        )

    def extra_repr(self) -> str:
        return f"eps={self.variance_epsilon}"


def make_norm(config: GladeConfig) -> nn.Module:
    width, eps, gain = config.n_embd, config.layer_norm_epsilon, config.norm_gain
    if config.norm == "layernorm":
        return nn.LayerNorm(width, eps=eps, elementwise_affine=gain, bias=config.bias and gain)
    return GladeRMSNorm(width, eps=eps) if gain else GladeUnitRMSNorm(eps=eps)


def make_qk_norm(config: GladeConfig, head_dim: int) -> nn.Module:
    """QK-norm is an RMSNorm whatever `norm` says (as in Qwen3 and nanochat)."""
    if config.norm_gain:
        return GladeRMSNorm(head_dim, eps=config.layer_norm_epsilon)
    return GladeUnitRMSNorm(eps=config.layer_norm_epsilon)


class GladeRotaryEmbedding(nn.Module):
    """cos and sin of each position's rotation angles (RoPE), from transformers' `rope_parameters`."""

    def __init__(self, config: GladeConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = config.n_positions
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: GladeConfig, **kwargs) -> tuple[torch.Tensor, float]:
        """One frequency per pair of a head's rotating channels: theta^(-2i / rotary_dim)."""
        base = config.rope_parameters["rope_theta"]
        dim = config.rotary_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@use_kernel_forward_from_hub("rotary_pos_emb")
def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate [batch, heads, seq, head_dim] queries and keys by their positions' angles."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


def apply_partial_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first cos.shape[-1] channels of each head (GPT-NeoX's partial rotary); the rest pass as they are."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == query.shape[-1]:
        return apply_rotary_pos_emb(query, key, cos, sin)
    query_rot, key_rot = apply_rotary_pos_emb(query[..., :rotary_dim], key[..., :rotary_dim], cos, sin)
    return (
        torch.cat((query_rot, query[..., rotary_dim:]), dim=-1),
        torch.cat((key_rot, key[..., rotary_dim:]), dim=-1),
    )


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


@use_kernelized_func(apply_rotary_pos_emb)
class GladeAttention(nn.Module):
    """Causal multi-head self-attention with a fused q|k|v projection (fewer key/value heads with GQA)."""

    def __init__(self, config: GladeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.n_embd // config.n_head
        self.num_key_value_groups = config.n_head // config.n_kv_head
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        query_size, kv_size = config.n_head * self.head_dim, config.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, query_size + 2 * kv_size, bias=config.bias)
        self.qkv_sizes = (query_size, kv_size, kv_size)
        # Rows of the fused weight that are separate matrices, for optimizers that treat each alone.
        self.c_attn.fused_output_sizes = self.qkv_sizes
        if config.qk_norm:
            self.q_norm, self.k_norm = make_qk_norm(config, self.head_dim), make_qk_norm(config, self.head_dim)
        # A gain does not commute with the rotation, so Qwen3 normalises first; without one the order only changes
        # rounding, and nanochat rotates first.
        self.qk_norm_after_rope = config.qk_norm and not config.norm_gain
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        if layer_idx in config.value_embedding_layers:
            self.ve_gate = nn.Linear(config.value_gate_channels, config.n_kv_head, bias=False)
            self.ve_gate.is_value_gate = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        value_embedding: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = (
            states.view(hidden_shape) for states in self.c_attn(hidden_states).split(self.qkv_sizes, dim=-1)
        )
        if value_embedding is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(hidden_states[..., : self.ve_gate.in_features]))
            # The table is not autocast: its fp32 rows would promote the values past the queries' and keys' dtype.
            value = value + (gate.unsqueeze(-1) * value_embedding.view(hidden_shape)).to(value.dtype)
        if self.config.qk_norm and not self.qk_norm_after_rope:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if position_embeddings is not None:
            query, key = apply_partial_rotary_pos_emb(query, key, *position_embeddings)
        if self.qk_norm_after_rope:
            query, key = self.q_norm(query), self.k_norm(key)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attn_pdrop if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.resid_dropout(self.c_proj(attn_output)), attn_weights


class GladeMLP(nn.Module):
    def __init__(self, config: GladeConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.act = ACTIVATIONS[config.activation_function]
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class GladeGatedMLP(nn.Module):
    """SwiGLU (Shazeer 2020): the SiLU of one projection gates another, then a third projects back."""

    def __init__(self, config: GladeConfig):
        super().__init__()
        self.c_gate = nn.Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.gate_act = ACT2FN["silu"]  # transformers' SiLU module, which Hub kernels replace on GPUs
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gate_act(self.c_gate(hidden_states)) * self.c_fc(hidden_states)))


class GladeBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: tokens talk (attention), then think (MLP)."""

    def __init__(self, config: GladeConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = GladeAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = GladeGatedMLP(config) if config.activation_function == "swiglu" else GladeMLP(config)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        value_embedding: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.attn(
            self.ln_1(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            value_embedding=value_embedding,
            **kwargs,
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GladePreTrainedModel(PreTrainedModel):
    config: GladeConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GladeBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": GladeBlock,
        "attentions": GladeAttention,
    }
    # Old GPT-2 checkpoints store the causal mask as buffers; Glade builds masks on the fly.
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.(masked_)?bias$"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # GPT-2 scales each residual-path projection by 1/sqrt(2 * n_layer) so the residual stream's variance does
        # not grow with depth; zero_init starts them at zero, so every block begins as the identity. The flags live
        # on the leaf Linears: transformers only visits modules owning parameters.
        if getattr(module, "is_residual_projection", False):
            if self.config.zero_init:
                init.zeros_(module.weight)
            else:
                std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
                init.normal_(module.weight, mean=0.0, std=std)
        elif getattr(module, "is_output_head", False) and self.config.zero_init and not self.config.tie_word_embeddings:
            init.zeros_(module.weight)  # uniform first predictions; a tied head is the embedding and keeps its init
        elif getattr(module, "is_value_gate", False):
            init.zeros_(module.weight)  # a gate of 2 sigmoid(0) = 1: the value embeddings enter at full weight
        elif isinstance(module, GladeModel) and self.config.residual_lambdas:
            init.ones_(module.resid_lambdas)
            init.zeros_(module.x0_lambdas)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            # safetensors' own message names neither the checkpoint nor the likely cause.
            raise OSError(
                f"Checkpoint {pretrained_model_name_or_path} has a corrupt or truncated safetensors file ({error}); "
                "re-download or re-save it"
            ) from error

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers records only the saving class in `auto_map`; loaders without glade need every entry point.
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update(
            {
                "AutoConfig": "configuration_glade.GladeConfig",
                "AutoModel": "modeling_glade.GladeModel",
                "AutoModelForCausalLM": "modeling_glade.GladeForCausalLM",
            }
        )
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


class GladeModel(GladePreTrainedModel):
    def __init__(self, config: GladeConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        else:
            self.rotary_emb = GladeRotaryEmbedding(config)
        if config.embedding_norm:
            self.ln_emb = make_norm(config)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GladeBlock(config, layer_idx) for layer_idx in range(config.n_layer)])
        kv_size = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict(
            {str(layer_idx): nn.Embedding(config.vocab_size, kv_size) for layer_idx in config.value_embedding_layers}
        )
        if config.residual_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.ln_f = make_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds (got both or neither)")
        if self.config.value_embeddings and input_ids is None:
            raise ValueError("This model's value embeddings look up each token's id: pass input_ids, not inputs_embeds")
        # Continuous batching's PagedAttentionCache is no Cache: it has no length, and it passes every position.
        past_length = cache.get_seq_length() if isinstance(cache, Cache) else 0
        seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if not torch.compiler.is_compiling():  # the checks read tensor values, which would break the graph
            self._check_inputs(input_ids, position_ids, past_length + seq_length)

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        # transformers finds packed sequences (position_ids restarting within a row) only when there is no cache, so
        # the mask comes before the cache made here, which is empty and would change no mask. Positions made here
        # never restart: leaving them out keeps sdpa's mask-free causal kernel, under torch.compile too.
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, past_length, seq_length, inputs_embeds.device)

        position_embeddings = None
        if self.config.positions == "learned":
            inputs_embeds = inputs_embeds + self.wpe(position_ids)
        else:
            position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        if self.config.embedding_norm:
            inputs_embeds = self.ln_emb(inputs_embeds)
        hidden_states = x0 = self.drop(inputs_embeds)
        for layer_idx, block in enumerate(self.h):
            if self.config.residual_lambdas:
                hidden_states = self.resid_lambdas[layer_idx] * hidden_states + self.x0_lambdas[layer_idx] * x0
            table = self.value_embeds[str(layer_idx)] if str(layer_idx) in self.value_embeds else None
            hidden_states = block(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                value_embedding=None if table is None else table(input_ids),
                position_ids=position_ids,  # flash attention finds packed sequences in them
                cache=cache,
                **kwargs,
            )
        hidden_states = self.ln_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)

    def _check_inputs(
        self, input_ids: torch.Tensor | None, position_ids: torch.Tensor | None, total_length: int
    ) -> None:
        if self.config.positions == "rotary":
            self._warn_past_trained_length(total_length)
        elif position_ids is None:
            self._check_length(total_length)
        # A packed row (sequences end to end, each starting again at position 0) can be longer than n_positions while
        # no position is. Reading the ids makes a GPU wait, so there they are read only for a row that long.
        elif position_ids.numel() > 0 and (
            position_ids.device.type == "cpu" or total_length > self.config.n_positions
        ):
            self._check_highest_position(int(position_ids.max()))
        # Out-of-range ids would otherwise fail deep inside an embedding lookup (or silently on some devices). Reading
        # the ids' values is free on the CPU but would make a GPU wait on every forward; there, an out-of-range id
        # fails in the embedding kernel instead.
        if input_ids is None or input_ids.numel() == 0 or input_ids.device.type != "cpu":
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids contains token id {bad}, outside the vocabulary [0, {self.config.vocab_size - 1}] "
                f"(vocab_size={self.config.vocab_size})"
            )

    def _check_length(self, total_length: int) -> None:
        if total_length > self.config.n_positions:
            raise ValueError(
                f"Sequence length {total_length} (cache + input) exceeds the model's maximum of "
                f"n_positions={self.config.n_positions}"
            )

    def _check_highest_position(self, highest: int) -> None:
        n_positions = self.config.n_positions
        if highest >= n_positions:
            raise ValueError(
                f"position_ids holds position {highest}, beyond the model's last position {n_positions - 1} "
                f"(n_positions={n_positions})"
            )

    def _warn_past_trained_length(self, total_length: int) -> None:
        # Rotary positions have no table to run out of: as in Llama, n_positions is the trained length. Past it, an
        # unscaled rotation meets angles it never trained on.
        if total_length > self.config.n_positions and self.config.rope_parameters.get("rope_type") == "default":
            logger.warning_once(
                f"Sequence length {total_length} is past the {self.config.n_positions} positions this model was "
                "trained on (n_positions), with no RoPE scaling: expect quality to drop. Set rope_parameters "
                "(e.g. {'rope_type': 'yarn', 'factor': 2.0}) to scale the rotation."
            )

    @staticmethod
    def _position_ids(
        attention_mask: torch.Tensor | None, past_length: int | torch.Tensor, seq_length: int, device: torch.device
    ) -> torch.Tensor:
        if attention_mask is not None and attention_mask.dim() == 2:
            # Left padding: a row's first real token is position 0, whatever the padding before it.
            positions = attention_mask.long().cumsum(-1) - 1
            return positions.clamp(min=0)[:, -seq_length:]
        return (torch.arange(seq_length, device=device) + past_length).unsqueeze(0)


class GladeForCausalLM(GladePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: GladeConfig):
        super().__init__(config)
        self.transformer = GladeModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.is_output_head = True
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        labels: token ids to predict, aligned with `input_ids` (the shift happens inside); -100 is ignored.
        logits_to_keep: compute logits for only the last N positions (0 = all), as generation needs just one.
        skip_logits: compute the loss straight from the hidden states, chunk by chunk, and return `logits=None`
            (the convention of Liger Kernel and the Trainer). Default: in training mode when labels are given. The
            full logits and their fp32 copies are most of a small model's training memory.
        """
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True needs labels: without a loss to compute, the logits are the only output")
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        logits = loss = None
        if skip_logits and self._can_fuse_loss(logits_to_keep):
            loss = causal_lm_loss_from_hidden(
                outputs.last_hidden_state, self.lm_head.weight, labels, logit_softcap=self.config.logit_softcap,
                **kwargs,
            )
        else:
            logits = self.unembed(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def generate(
        self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs
    ) -> torch.Tensor:
        """transformers' `generate()`, run on Glade's fast decoder when the request fits it (`fast_generate.py`):
        the same tokens, greedy or seeded. `fast_decoding="off"` (a keyword or a generation config field) turns it
        off; `generator=` seeds the sampling on either route."""
        return fast_generate(self, super().generate, inputs, generation_config, **kwargs)

    def unembed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states: the output head, then the soft cap if the config sets one."""
        logits = self.lm_head(hidden_states)
        softcap = self.config.logit_softcap
        return logits if softcap is None else softcap * torch.tanh(logits / softcap)

    def _can_fuse_loss(self, logits_to_keep: int | torch.Tensor) -> bool:
        # Only the stock loss over every position of a plain Linear head is reproduced; a custom loss function, a
        # wrapped head (adapters, quantization, hooks, tensor parallelism's replaced forward) or sliced logits take the
        # ordinary path.
        head = self.lm_head
        return (
            self.loss_function is LOSS_MAPPING["ForCausalLM"]
            and type(head) is nn.Linear
            and not (head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"))
            and "forward" not in vars(head)
            and head.weight.is_floating_point()
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 0
        )


class GladeForSequenceClassification(GenericForSequenceClassification, GladePreTrainedModel):
    base_model_prefix = "transformer"


class GladeForTokenClassification(GenericForTokenClassification, GladePreTrainedModel):
    base_model_prefix = "transformer"


class GladeForQuestionAnswering(GenericForQuestionAnswering, GladePreTrainedModel):
    base_model_prefix = "transformer"

    # transformers' generic head reads `embed_tokens` off the base model; Glade's embedding keeps GPT-2's name.
    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.transformer.set_input_embeddings(new_embeddings)


# PEFT picks a LoRA's default target modules from its own table, by model_type: for Glade, every projection of the
# blocks (the head and embeddings stay frozen), so `LoraConfig()` works without naming modules.
LORA_TARGET_MODULES = ("c_attn", "c_proj", "c_fc", "c_gate")


def register_with_peft() -> None:
    """Add Glade's default LoRA targets to PEFT's table, where PEFT is installed (importing it takes ~0.3 s)."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:  # PEFT is optional, and the remote code must load without it
        return
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("glade", list(LORA_TARGET_MODULES))


register_with_peft()

__all__ = [
    "GladePreTrainedModel",
    "GladeModel",
    "GladeForCausalLM",
    "GladeForSequenceClassification",
    "GladeForTokenClassification",
    "GladeForQuestionAnswering",
]
