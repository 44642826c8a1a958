"""Glade: the GPT-2 architecture as a transformers 5 model.

tokens -> token + position embeddings -> n_layer x [LayerNorm -> attention ("tokens talk") -> residual,
LayerNorm -> MLP ("tokens think") -> residual] -> LayerNorm -> unembedding (tied to the embedding) -> logits.

Parameter names follow GPT-2 (`transformer.h.0.attn.c_attn`, ...), but projections are `nn.Linear`, so a GPT-2
checkpoint (whose `Conv1D` stores weights as in x out) converts by transposing, never renaming.

This file ships as Hub remote code: it imports only torch, transformers and its sibling config file.
"""

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_glade import GladeConfig

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
}


# Rows of logits per chunk of the fused loss: 8M fp32 values (32 MiB), small next to a full [tokens, vocab] tensor,
# but at least 512 rows, because every chunk adds its weight gradient into a [vocab, n_embd] fp32 buffer (through an
# fp32 temporary on CPU), passes over memory that must stay cheap next to the chunk's matmuls.
LOSS_CHUNK_ELEMENTS = 2**23
LOSS_CHUNK_MIN_ROWS = 512


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, never holding more than one chunk of logits.

    The loss is a scalar, so its gradient is known up to the incoming scale while the chunk's logits are at hand: the
    forward computes the gradients too (softmax minus one-hot), chunk by chunk, and backward only scales them. This
    runs the same three matmuls as logits + `cross_entropy`, in the same dtype (the autocast dtype when autocast is
    on), with fp32 softmax, but without the full logits, their fp32 copy, log-softmax output and logit gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, compute_dtype: torch.dtype):
        wants_hidden_grad, wants_weight_grad = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
            valid = targets != ignore_index
            safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
            loss = hidden.new_zeros((), dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden) if wants_hidden_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight_grad else None
            chunk = max(LOSS_CHUNK_MIN_ROWS, LOSS_CHUNK_ELEMENTS // weight.shape[0])
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = (hidden_c[rows] @ weight_c.T).float()
                target_logits = logits.gather(1, safe_targets[rows]).squeeze(1)
                max_logits = logits.amax(dim=-1, keepdim=True)
                exp_logits = logits.sub_(max_logits).exp_()  # in place: one [rows, vocab] buffer serves throughout
                sum_exp = exp_logits.sum(dim=-1)
                loss += ((max_logits.squeeze(1) + sum_exp.log() - target_logits) * valid[rows]).sum()
                if not (wants_hidden_grad or wants_weight_grad):
                    continue
                # d loss / d logits = softmax - one_hot(target), and zero on ignored rows.
                grad_logits = exp_logits.mul_((valid[rows] / sum_exp).unsqueeze(1))
                grad_logits.scatter_add_(1, safe_targets[rows], -valid[rows, None].float())
                grad_logits = grad_logits.to(compute_dtype)
                if wants_hidden_grad:
                    grad_hidden[rows] = grad_logits @ weight_c
                if wants_weight_grad:
                    grad_weight += grad_logits.T @ hidden_c[rows]
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if wants_weight_grad else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def causal_lm_loss_from_hidden(
    hidden_states: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss` of the logits `hidden_states @ head_weight.T`, computed without them: the same
    label shift, `ignore_index` and `num_items_in_batch` (sum / count) versus mean reduction."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    device_type = hidden_states.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else head_weight.dtype
    )
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    loss = LinearCrossEntropy.apply(hidden_states, head_weight, targets, ignore_index, compute_dtype)
    if num_items_in_batch is None:
        return loss / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


# Queries per block of the compiled CPU attention: a block's fp32 scores stay cache-sized, and blocks skip most of
# the masked upper triangle.
ATTENTION_BLOCK = 128


def causal_block_scores(query: torch.Tensor, key: torch.Tensor, start: int, scaling: float) -> torch.Tensor:
    """fp32 attention scores of the queries at positions start.. against the keys 0..start+len(query), causal."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    rows = torch.arange(start, start + query.shape[-2], device=query.device).unsqueeze(1)
    future = torch.arange(key.shape[-2], device=query.device).unsqueeze(0) > rows
    return scores.masked_fill(future, float("-inf"))


class BlockCausalAttention(torch.autograd.Function):
    """softmax(q k^T * scaling + causal mask) v as explicit matmuls over blocks of queries, for torch.compile on CPU.

    Like flash attention it keeps only the output and the log-sum-exp for backward, and recomputes the probabilities
    there. Each block of queries meets only the keys up to its own last position. Inductor fuses the element-wise
    softmax work around the matmuls, which makes this faster than torch's CPU flash kernel at short sequence lengths;
    in eager mode those element-wise passes stay separate and the flash kernel is faster, so this is used only when
    compiling. Matmuls run in the inputs' dtype and the softmax in fp32, as in `eager_attention_forward`.
    """

    @staticmethod
    def forward(ctx, query, key, value, scaling: float):
        output = torch.empty_like(query)
        log_normalizers = []
        for start in range(0, query.shape[-2], ATTENTION_BLOCK):
            end = min(start + ATTENTION_BLOCK, query.shape[-2])
            scores = causal_block_scores(query[..., start:end, :], key[..., :end, :], start, scaling)
            log_normalizer = scores.logsumexp(dim=-1, keepdim=True)
            probs = (scores - log_normalizer).exp().to(query.dtype)
            output[..., start:end, :] = torch.matmul(probs, value[..., :end, :])
            log_normalizers.append(log_normalizer)
        ctx.save_for_backward(query, key, value, output, torch.cat(log_normalizers, dim=-2))
        ctx.scaling = scaling
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, log_normalizer = ctx.saved_tensors
        grad_output = grad_output.to(query.dtype)
        # d softmax: grad_scores = probs * (grad_probs - rowsum(grad_output * output)).
        delta = (grad_output.float() * output.float()).sum(dim=-1, keepdim=True)
        grad_query = torch.empty_like(query)
        grad_key = torch.zeros_like(key, dtype=torch.float32)
        grad_value = torch.zeros_like(value, dtype=torch.float32)
        for start in range(0, query.shape[-2], ATTENTION_BLOCK):
            end = min(start + ATTENTION_BLOCK, query.shape[-2])
            block_query, block_grad = query[..., start:end, :], grad_output[..., start:end, :]
            scores = causal_block_scores(block_query, key[..., :end, :], start, ctx.scaling)
            probs = (scores - log_normalizer[..., start:end, :]).exp()
            grad_value[..., :end, :] += torch.matmul(probs.to(query.dtype).transpose(-1, -2), block_grad)
            grad_probs = torch.matmul(block_grad, value[..., :end, :].transpose(-1, -2)).float()
            grad_scores = (probs * (grad_probs - delta[..., start:end, :]) * ctx.scaling).to(query.dtype)
            grad_query[..., start:end, :] = torch.matmul(grad_scores, key[..., :end, :])
            grad_key[..., :end, :] += torch.matmul(grad_scores.transpose(-1, -2), block_query)
        return grad_query, grad_key.to(key.dtype), grad_value.to(value.dtype), None


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
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class GladeAttention(nn.Module):
    """Causal multi-head self-attention with a fused q|k|v projection."""

    def __init__(self, config: GladeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.n_embd // config.n_head
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # Rows of the fused weight that are separate matrices (q | k | v), for optimizers that treat each alone.
        self.c_attn.fused_output_sizes = (config.n_embd, config.n_embd, config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = self.c_attn(hidden_states).split(self.config.n_embd, dim=-1)
        query = query.view(hidden_shape).transpose(1, 2)
        key = key.view(hidden_shape).transpose(1, 2)
        value = value.view(hidden_shape).transpose(1, 2)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        dropout = self.config.attn_pdrop if self.training else 0.0
        if self._use_block_attention(query, key, attention_mask, dropout):
            attn_output = BlockCausalAttention.apply(query, key, value, self.scaling).transpose(1, 2)
            attn_weights = None
        else:
            attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            attn_output, attn_weights = attention_interface(
                self,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=self.scaling,
                **kwargs,
            )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.resid_dropout(self.c_proj(attn_output)), attn_weights

    def _use_block_attention(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float
    ) -> bool:
        # sdpa's job, done faster when compiling for CPU: whole causal sequences (no padding mask, no cached prefix),
        # without attention dropout, which the block kernel does not implement.
        return (
            torch.compiler.is_compiling()
            and query.device.type == "cpu"
            and self.config._attn_implementation == "sdpa"
            and attention_mask is None
            and dropout == 0.0
            and query.shape[-2] == key.shape[-2] > 1
        )


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


class GladeBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block: tokens talk (attention), then think (MLP)."""

    def __init__(self, config: GladeConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = GladeAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = GladeMLP(config)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.attn(self.ln_1(hidden_states), attention_mask=attention_mask, cache=cache, **kwargs)
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
        # not grow with depth. The flag lives on the leaf Linear: transformers only visits modules owning parameters.
        if getattr(module, "is_residual_projection", False):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range / math.sqrt(2 * self.config.n_layer))

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
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GladeBlock(config, layer_idx) for layer_idx in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
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
        past_length = cache.get_seq_length() if cache is not None else 0
        seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if not torch.compiler.is_compiling():  # the checks read tensor values, which would break the graph
            self._check_inputs(input_ids, past_length + seq_length)

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, past_length, seq_length, inputs_embeds.device)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )

        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))
        for block in self.h:
            hidden_states = block(hidden_states, attention_mask=causal_mask, cache=cache, **kwargs)
        hidden_states = self.ln_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)

    def _check_inputs(self, input_ids: torch.Tensor | None, total_length: int) -> None:
        # Out-of-range ids would otherwise fail deep inside an embedding lookup (or silently on some devices).
        if total_length > self.config.n_positions:
            raise ValueError(
                f"Sequence length {total_length} (cache + input) exceeds the model's maximum of "
                f"n_positions={self.config.n_positions}"
            )
        if input_ids is None or input_ids.numel() == 0:
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids contains token id {bad}, outside the vocabulary [0, {self.config.vocab_size - 1}] "
                f"(vocab_size={self.config.vocab_size})"
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
            loss = causal_lm_loss_from_hidden(outputs.last_hidden_state, self.lm_head.weight, labels, **kwargs)
        else:
            logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


    def _can_fuse_loss(self, logits_to_keep: int | torch.Tensor) -> bool:
        # Only the stock loss over every position of a plain Linear head is reproduced; a custom loss function, a
        # wrapped head (adapters, quantization, hooks) or sliced logits take the ordinary path.
        head = self.lm_head
        return (
            self.loss_function is LOSS_MAPPING["ForCausalLM"]
            and type(head) is nn.Linear
            and not (head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"))
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


__all__ = [
    "GladePreTrainedModel",
    "GladeModel",
    "GladeForCausalLM",
    "GladeForSequenceClassification",
    "GladeForTokenClassification",
    "GladeForQuestionAnswering",
]
