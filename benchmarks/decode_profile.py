"""Where a batch-1 decoding step's milliseconds go, against the memory floor measured on this machine.

    python benchmarks/decode_profile.py            # fp32 and bf16, the benchmark's small shape, ~2 minutes
    python benchmarks/decode_profile.py --quick    # tiny shape, seconds

At batch 1 every new token reads every weight once, so the floor of a step is the weights' bytes over the rate at
which this machine streams memory (measured here with a plain sum over a buffer of the same size). For GPT-2's
`generate()` and for Glade's `CompiledDecoder`, one profiled run of the benchmark's decode splits each token's time
into the profiler's operator categories, and the rest (Python: generate()'s loop, module calls, guards) is wall time
minus what the operators account for.
"""

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers.utils import logging

from glade.decoding import DecodeKernels
from glade.hardware import cpu_name

from models import QUICK_SHAPES, SHAPES, build_models, greedy_generate

# Operator names (profiler keys) by what they are; anything else counts as "other operators".
CATEGORIES = {
    "matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
}


def best_seconds(function: Callable[[], object], repeats: int) -> float:
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def weight_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """What one decoding step reads: every projection and the output head (tied heads counted once)."""
    seen, matrices = set(), []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.data_ptr() not in seen:
            seen.add(module.weight.data_ptr())
            matrices.append(module.weight.detach())
    return matrices


def floors(matrices: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Milliseconds to stream the weights' bytes, and to multiply one row by every matrix two ways."""
    flat = torch.cat([matrix.flatten() for matrix in matrices])
    rows = {matrix.shape[1]: torch.randn(1, matrix.shape[1], dtype=matrix.dtype) for matrix in matrices}

    def library_products():
        for matrix in matrices:
            F.linear(rows[matrix.shape[1]], matrix)

    @torch.compile(fullgraph=True)
    def fused_products(matrices):
        with DecodeKernels():
            return [F.linear(rows[matrix.shape[1]], matrix) for matrix in matrices]

    return {
        "weights_mb": flat.numel() * flat.element_size() / 1e6,
        "stream_ms": 1e3 * best_seconds(flat.sum, repeats),
        "library_matvec_ms": 1e3 * best_seconds(library_products, repeats),
        "fused_matvec_ms": 1e3 * best_seconds(lambda: fused_products(matrices), repeats),
    }


def profile_per_token(generate: Callable[[], object], new_tokens: int, repeats: int) -> dict[str, float]:
    """Milliseconds per new token: wall time, and the operators' self time by category; the rest is Python."""
    wall = statistics.median(best_seconds(generate, 1) for _ in range(repeats)) / new_tokens
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        generate()
    spent = defaultdict(float)
    for event in profiler.key_averages():
        if event.key.startswith("graph_"):
            category = "compiled kernels"
        elif event.key.startswith("## Call CompiledFxGraph"):
            category = "compiled graph's wrapper"  # allocations, and ~100 weight tensors handed to the kernels
        elif event.key.startswith(("Torch-Compiled Region", "Pregraph bytecode", "AOTDispatcher",
                                   "TorchDynamo Cache Lookup")):
            category = "torch.compile entry (guards, inputs)"
        else:
            category = next((name for name, keys in CATEGORIES.items() if event.key in keys), "other operators")
        spent[category] += event.self_cpu_time_total / 1e3 / new_tokens
    # Self CPU time of parallel regions counts the calling thread's wall time; the profiler adds overhead, so the
    # shares come from the profiled run and are scaled to the unprofiled wall time.
    profiled_total = sum(spent.values())
    result = {"wall_ms": 1e3 * wall}
    scale = min(1.0, 1e3 * wall / profiled_total) if profiled_total else 1.0
    for category, ms in sorted(spent.items(), key=lambda item: -item[1]):
        result[category] = ms * scale
    result["python and the rest"] = max(0.0, 1e3 * wall - sum(ms * scale for ms in spent.values()))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, few repeats")
    args = parser.parse_args(argv)
    logging.set_verbosity_error()
    # Each kernel of a compiled graph becomes a profiler event of its own (named graph_...).
    torch._inductor.config.cpp.enable_kernel_profile = True
    shape = (QUICK_SHAPES if args.quick else SHAPES)["small"]
    prompt_tokens, new_tokens, repeats = (8, 8, 2) if args.quick else (32, 128, 5)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; batch 1, {prompt_tokens}-token "
          f"prompt, {new_tokens} new tokens, {shape.n_layer} layers x {shape.n_embd}, vocab {shape.vocab_size}")
    for dtype in (torch.float32, torch.bfloat16):
        models = {name: model.eval().to(dtype) for name, model in build_models(shape).items() if name != "nanogpt"}
        prompt = torch.randint(0, shape.vocab_size - 1, (1, prompt_tokens))
        measured = floors(weight_matrices(models["glade"]), repeats=20)
        print(f"\n{str(dtype).removeprefix('torch.')}: {measured['weights_mb']:.1f} MB of weights per token; "
              f"streaming them: {measured['stream_ms']:.2f} ms (the floor, "
              f"{measured['weights_mb'] / measured['stream_ms']:.0f} GB/s); one row times every matrix: "
              f"{measured['library_matvec_ms']:.2f} ms with F.linear, {measured['fused_matvec_ms']:.2f} ms compiled "
              "as DecodeKernels writes it")
        for variant, model_name in (("gpt2", "gpt2"), ("glade+compile", "glade")):
            run = greedy_generate(variant, models[model_name], prompt_tokens + new_tokens)
            parts = profile_per_token(lambda: run(prompt, new_tokens), new_tokens, repeats)
            label = "GPT-2 generate()" if variant == "gpt2" else "Glade CompiledDecoder"
            details = ", ".join(f"{name} {ms:.2f}" for name, ms in parts.items() if name != "wall_ms")
            print(f"  {label}: {parts['wall_ms']:.2f} ms/token = {details} "
                  f"({parts['wall_ms'] / measured['stream_ms']:.1f}x the floor)")


if __name__ == "__main__":
    main()
