"""How a compiled CPU training step should run, chosen by timing one transformer block each way on this machine.

Under torch.compile on CPU, Glade's block attention (`glade_block`: explicit matmuls over blocks of queries, fused by
inductor) and sdpa's flash kernel win on different CPUs: on an AMD EPYC (Zen 4, no AMX) block attention made a
training step ~15% faster, while matmul-heavy CPUs with AMX change the balance. On an AVX2-only CPU (Zen 3) in fp32,
compiling did not pay at all: the compiled model trained slower than the eager one. So one block (norms, attention,
MLP) is timed forward and backward at the run's own shape, uncompiled and compiled with each attention kernel; it
takes seconds, a small price next to a training run, and settles it per machine.
"""

import copy
import statistics
import time
from dataclasses import dataclass

import torch

from glade.configuration_glade import GladeConfig
from glade.kernels_glade import BLOCK_ATTENTION
from glade.modeling_glade import GladeBlock, GladeRotaryEmbedding

CANDIDATES = ("sdpa", BLOCK_ATTENTION)
# Not compiling at all: the block as eager PyTorch runs it, with sdpa.
UNCOMPILED = "uncompiled"


@dataclass(frozen=True)
class KernelChoice:
    # UNCOMPILED, or the attention implementation to compile with.
    implementation: str
    # Median milliseconds of one forward (+ backward) of one block, per candidate.
    milliseconds: dict[str, float]
    backward: bool = True

    @property
    def compiled(self) -> bool:
        return self.implementation != UNCOMPILED

    def describe(self) -> str:
        timings = ", ".join(f"{name} {ms:.1f} ms" for name, ms in self.milliseconds.items())
        work = "forward + backward" if self.backward else "forward"
        return f"{self.implementation} ({timings} per block, {work})"


def time_block(
    block: GladeBlock,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    compiled: bool,
    dtype: torch.dtype,
    repeats: int,
    backward: bool = True,
) -> float:
    """Median seconds of a forward (+ backward) of `block` under autocast to `dtype` (fp32 weights), compiled or not."""
    run = torch.compile(block, fullgraph=True) if compiled else block
    grad_output = torch.randn_like(hidden)

    def forward_backward() -> float:
        inputs = hidden.detach().requires_grad_(backward)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), torch.set_grad_enabled(backward):
            output = run(inputs, position_embeddings=position_embeddings)
        if backward:
            output.backward(grad_output)
        return time.perf_counter() - start

    forward_backward()  # compiles
    forward_backward()
    return statistics.median(forward_backward() for _ in range(repeats))


def choose_kernel(
    config: GladeConfig, batch_size: int, seq_len: int, dtype: torch.dtype, repeats: int = 5, backward: bool = True,
    uncompiled: bool = False,
) -> KernelChoice:
    """Time one block of `config` on random inputs at this batch shape and dtype (the autocast dtype under mixed
    precision), forward and backward (forward only for inference), compiled with each attention candidate and, with
    `uncompiled`, not compiled at all; choose the fastest."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch_size, seq_len, config.n_embd, generator=generator)
    position_embeddings = None
    if config.positions != "learned":
        positions = torch.arange(seq_len).expand(batch_size, seq_len)
        position_embeddings = GladeRotaryEmbedding(config)(hidden, positions)
    candidates = ((UNCOMPILED,) if uncompiled else ()) + CANDIDATES
    milliseconds = {}
    # Each candidate is a new entry in torch.compile's cache; leave room beyond the default of 8.
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
        for name in candidates:
            block_config = copy.deepcopy(config)
            block_config._attn_implementation = "sdpa" if name == UNCOMPILED else name
            block = GladeBlock(block_config, layer_idx=0).train(backward)
            seconds = time_block(block, hidden, position_embeddings, name != UNCOMPILED, dtype, repeats, backward)
            milliseconds[name] = 1e3 * seconds
    return KernelChoice(min(milliseconds, key=milliseconds.__getitem__), milliseconds, backward)
