"""Glade's kernels: a fused linear + cross-entropy loss, and causal attention in blocks of queries.

The loss serves `GladeForCausalLM` in training (`skip_logits`); block attention is an attention implementation that a
user selects by name, `attn_implementation="glade_block"`, registered with transformers when this module is imported.
This file ships beside `modeling_glade.py` as Hub remote code (transformers copies a modeling file's relative
imports), so it imports only torch and transformers.
"""

import torch
import torch.nn.functional as F
from torch import nn

from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

# Rows of logits per chunk of the fused loss: 4M fp32 values (16 MiB), small next to a full [tokens, vocab] tensor,
# but at least 512 rows, because every chunk adds its weight gradient into a [vocab, n_embd] fp32 buffer, a pass over
# memory that must stay cheap next to the chunk's matmuls. The chunk's buffers are allocated once per call and every
# pass over them is in place: on CPU a fresh buffer of this size costs more in page faults than the pass that fills it
# (glibc maps blocks of 32 MiB and more anew for each allocation), which once made soft-capping cost a third of a step.
LOSS_CHUNK_ELEMENTS = 2**22
LOSS_CHUNK_MIN_ROWS = 512


class ChunkBuffers:
    """The fused loss's per-chunk buffers: fp32 logits (the softmax and its gradient are computed in them; with a soft
    cap they keep the sigmoid its gradient needs, and the softmax gets a buffer of its own), and, when matmuls run in
    a narrower dtype, that dtype's product."""

    def __init__(self, rows: int, vocab: int, compute_dtype: torch.dtype, device: torch.device, softcap: bool):
        self.logits = torch.empty((rows, vocab), dtype=torch.float32, device=device)
        self.exp = torch.empty_like(self.logits) if softcap else None
        narrow = compute_dtype != torch.float32
        self.product = torch.empty((rows, vocab), dtype=compute_dtype, device=device) if narrow else None

    def logits_of(self, hidden: torch.Tensor, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """fp32 `scale * hidden @ weight.T`: a narrower product is scaled as it is copied, with no second rounding."""
        logits = self.logits[: hidden.shape[0]]
        if self.product is None:
            return torch.matmul(hidden * scale if scale != 1.0 else hidden, weight.T, out=logits)
        # Scaled after the copy: torch.mul(product, scale, out=logits) would round the product in its narrow dtype.
        logits.copy_(torch.matmul(hidden, weight.T, out=self.product[: hidden.shape[0]]))
        return logits.mul_(scale) if scale != 1.0 else logits

    def in_compute_dtype(self, grad_logits: torch.Tensor) -> torch.Tensor:
        if self.product is None:
            return grad_logits
        return self.product[: grad_logits.shape[0]].copy_(grad_logits)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, never holding more than one chunk of logits.

    The loss is a scalar, so its gradient is known up to the incoming scale while the chunk's logits are at hand: the
    forward computes the gradients too (softmax minus one-hot), chunk by chunk, and backward only scales them. This
    runs the same three matmuls as logits + `cross_entropy`, in the same dtype (the autocast dtype when autocast is
    on), with fp32 softmax, but without the full logits, their fp32 copy, log-softmax output and logit gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, compute_dtype: torch.dtype, softcap: float | None):
        wants_hidden_grad, wants_weight_grad = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
            valid = targets != ignore_index
            safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
            loss = hidden.new_zeros((), dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden_c) if wants_hidden_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight_grad else None
            chunk = max(1, min(hidden.shape[0], max(LOSS_CHUNK_MIN_ROWS, LOSS_CHUNK_ELEMENTS // weight.shape[0])))
            buffers = ChunkBuffers(chunk, weight.shape[0], compute_dtype, hidden.device, softcap is not None)
            # With a cap c, logits are c tanh(z / c) = c (2 s - 1) with s = sigmoid(2 z / c), written so because
            # torch's CPU sigmoid is several times faster than its tanh: the chunk's logits come scaled by 2 / c
            # and become s in place. d loss / d z gains d(c tanh(z/c))/dz = 4 s (1 - s),
            # whose 4 joins the softmax's per-row scale.
            scale, gain = (1.0, 1.0) if softcap is None else (2 / softcap, 4.0)
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = buffers.logits_of(hidden_c[rows], weight_c, scale)
                if softcap is None:
                    target_logits = logits.gather(1, safe_targets[rows]).squeeze(1)
                    max_logits = logits.amax(dim=-1, keepdim=True)
                    exp_logits = logits.sub_(max_logits).exp_()
                else:
                    capped = logits.sigmoid_()
                    target_logits = capped.gather(1, safe_targets[rows]).squeeze(1).mul_(2 * softcap).sub_(softcap)
                    max_logits = capped.amax(dim=-1, keepdim=True).mul_(2 * softcap).sub_(softcap)
                    # c (2 s - 1) - max = 2 c s - (c + max)
                    exp_logits = torch.mul(capped, 2 * softcap, out=buffers.exp[: capped.shape[0]])
                    exp_logits.sub_(max_logits + softcap).exp_()
                sum_exp = exp_logits.sum(dim=-1)
                loss += ((max_logits.squeeze(1) + sum_exp.log() - target_logits) * valid[rows]).sum()
                if not (wants_hidden_grad or wants_weight_grad):
                    continue
                # d loss / d logits = softmax - one_hot(target), and zero on ignored rows.
                grad_logits = exp_logits.mul_((gain * valid[rows] / sum_exp).unsqueeze(1))
                grad_logits.scatter_add_(1, safe_targets[rows], -gain * valid[rows, None].float())
                if softcap is not None:
                    grad_logits.mul_(capped.addcmul_(capped, capped, value=-1))
                grad_logits = buffers.in_compute_dtype(grad_logits)
                if wants_hidden_grad:
                    torch.matmul(grad_logits, weight_c, out=grad_hidden[rows])
                if wants_weight_grad:
                    if grad_logits.dtype == torch.float32:
                        grad_weight.addmm_(grad_logits.T, hidden_c[rows])
                    else:
                        grad_weight += grad_logits.T @ hidden_c[rows]
        ctx.save_for_backward(
            grad_hidden.to(hidden.dtype) if wants_hidden_grad else None,
            grad_weight.to(weight.dtype) if wants_weight_grad else None,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def causal_lm_loss_from_hidden(
    hidden_states: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss` of the logits `hidden_states @ head_weight.T` (soft-capped to
    `logit_softcap * tanh(logits / logit_softcap)` when set), computed without them: the same label shift,
    `ignore_index` and `num_items_in_batch` (sum / count) versus mean reduction."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    device_type = hidden_states.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else head_weight.dtype
    )
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    loss = LinearCrossEntropy.apply(hidden_states, head_weight, targets, ignore_index, compute_dtype, logit_softcap)
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
    in eager mode those element-wise passes stay separate and the flash kernel is faster. Matmuls run in the inputs'
    dtype and the softmax in fp32, as in `eager_attention_forward`.
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


def repeat_kv(hidden_states: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * groups, seq, dim]: each key/value head serves `groups`
    query heads (grouped-query attention)."""
    if groups == 1:
        return hidden_states
    batch, kv_heads, seq, dim = hidden_states.shape
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, groups, seq, dim)
    return expanded.reshape(batch, kv_heads * groups, seq, dim)


BLOCK_ATTENTION = "glade_block"


def block_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The `glade_block` attention implementation: `BlockCausalAttention` for whole causal sequences (training and
    prefill without padding or attention dropout), sdpa for everything else (padding masks, packed sequences, decoding
    from a cache): those come with a mask, which the block kernel has no place for."""
    if attention_mask is not None or dropout > 0.0 or not query.shape[-2] == key.shape[-2] > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    output = BlockCausalAttention.apply(query, repeat_kv(key, groups), repeat_kv(value, groups), scaling)
    return output.transpose(1, 2), None


AttentionInterface.register(BLOCK_ATTENTION, block_attention_forward)
AttentionMaskInterface.register(BLOCK_ATTENTION, sdpa_mask)  # sdpa's masks: None when causality alone suffices
