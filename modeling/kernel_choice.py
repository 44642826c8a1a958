"""Which attention kernel a compiled CPU training step should use, chosen by timing both on this machine.

Under torch.compile on CPU, Glade's block attention (`glade_block`: explicit matmuls over blocks of queries, fused by
inductor) and sdpa's flash kernel win on different CPUs: on an AMD EPYC (Zen 4, no AMX) block attention made a
training step ~15% faster, while matmul-heavy CPUs with AMX change the balance. Timing one layer's attention at the
run's own shape takes seconds, a small price next to a training run, and settles it per machine.
"""

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_glade import GladeConfig
from .kernels_glade import BLOCK_ATTENTION

CANDIDATES = ("sdpa", BLOCK_ATTENTION)


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str
    # Median milliseconds of one compiled forward (+ backward) of one layer's attention, per candidate.
    milliseconds: dict[str, float]
    backward: bool = True

    def describe(self) -> str:
        timings = ", ".join(f"{name} {ms:.1f} ms" for name, ms in self.milliseconds.items())
        work = "forward + backward" if self.backward else "forward"
        return f"{self.implementation} ({timings} per layer's attention, {work})"


class CausalCaller(nn.Module):
    """The attributes that attention implementations read from the module calling them."""

    def __init__(self, groups: int):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = groups


def time_compiled_attention(
    implementation: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, repeats: int,
    backward: bool = True,
) -> float:
    """Median seconds of a compiled forward (+ backward) of causal attention with `implementation`."""
    attention = ALL_ATTENTION_FUNCTIONS[implementation]
    caller = CausalCaller(query.shape[1] // key.shape[1])

    def attend(query, key, value):
        return attention(caller, query, key, value, None, dropout=0.0, scaling=query.shape[-1] ** -0.5)[0]

    compiled = torch.compile(attend, fullgraph=True)
    grad_output = torch.randn_like(query.transpose(1, 2))

    def forward_backward() -> float:
        inputs = [tensor.detach().requires_grad_(backward) for tensor in (query, key, value)]
        start = time.perf_counter()
        output = compiled(*inputs)
        if backward:
            output.backward(grad_output)
        return time.perf_counter() - start

    forward_backward()  # compiles
    forward_backward()
    return statistics.median(forward_backward() for _ in range(repeats))


def fastest_compiled_attention(
    config: GladeConfig, batch_size: int, seq_len: int, dtype: torch.dtype, repeats: int = 5, backward: bool = True
) -> AttentionChoice:
    """Time each candidate on random queries, keys and values of one layer at this batch shape and dtype (the autocast
    dtype under mixed precision), forward and backward (forward only for inference), and choose the fastest."""
    head_dim = config.n_embd // config.n_head
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch_size, config.n_head, seq_len, head_dim, generator=generator).to(dtype)
    key, value = (
        torch.randn(batch_size, config.n_kv_head, seq_len, head_dim, generator=generator).to(dtype) for _ in range(2)
    )
    # Each candidate is a new entry in torch.compile's cache of this function; leave room beyond the default of 8.
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
        milliseconds = {
            name: 1e3 * time_compiled_attention(name, query, key, value, repeats, backward) for name in CANDIDATES
        }
    return AttentionChoice(min(milliseconds, key=milliseconds.__getitem__), milliseconds, backward)
