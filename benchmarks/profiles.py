"""Where the milliseconds of a decoding step and of a training step go, against floors measured on this machine.

    python benchmarks/profiles.py                  # both, the benchmark's small shape, ~3 minutes
    python benchmarks/profiles.py --only decode    # or train
    python benchmarks/profiles.py --quick          # tiny shape, seconds

Decoding: at batch 1 every new token reads every weight once, so the floor of a step is the weights' bytes over the
rate at which this machine streams memory (measured with a plain sum over a buffer of the same size). Training: the
floor is the step's matmul FLOPs at the matmul peak of its dtype (bf16 autocast where the CPU computes bf16 natively,
else fp32, as `glade pretrain` chooses) measured in the same run. For GPT-2 and for Glade's fastest
variant (`CompiledDecoder`; the compiled training step), one profiled run splits the time into the profiler's
operator categories, scaled to the unprofiled wall time; the rest (Python: generate()'s loop, module calls) is wall
time minus what the operators account for.
"""

import argparse
import statistics
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers.utils import logging

from glade.decoding import DecodeKernels
from glade.hardware import cpu_name

from models import QUICK_SHAPES, SHAPES, build_models, greedy_generate, make_batch, make_optimizer, training_step
from timing import BF16_CHOICES, best_seconds, matmul_peak_flops, measured_dtypes, seconds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Operator names (profiler keys) by what they are; anything else counts as "other operators".
CATEGORIES = {
    "matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention kernel": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "optimizer": ("aten::_fused_adamw_",),
}


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


def profile_per_unit(run: Callable[[], object], units: int, repeats: int) -> dict[str, float]:
    """Milliseconds per unit (a new token, a training step) of `run`: wall time, and the operators' self time by
    category; the rest is Python."""
    run()  # warm-up: compilation, caches
    wall = statistics.median(seconds(run) for _ in range(repeats)) / units
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        run()
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
        spent[category] += event.self_cpu_time_total / 1e3 / units
    # Self CPU time of parallel regions counts the calling thread's wall time; the profiler adds overhead, so the
    # shares come from the profiled run and are scaled to the unprofiled wall time.
    profiled_total = sum(spent.values())
    result = {"wall_ms": 1e3 * wall}
    scale = min(1.0, 1e3 * wall / profiled_total) if profiled_total else 1.0
    for category, ms in sorted(spent.items(), key=lambda item: -item[1]):
        result[category] = ms * scale
    result["python and the rest"] = max(0.0, 1e3 * wall - sum(ms * scale for ms in spent.values()))
    return result


def decode_profile(shape, prompt_tokens: int, new_tokens: int, repeats: int, dtypes: tuple[str, ...]) -> None:
    for dtype in (DTYPES[name] for name in sorted(dtypes, key=list(DTYPES).index)):
        models = {name: model.eval().to(dtype) for name, model in build_models(shape).items() if name != "nanogpt"}
        prompt = torch.randint(0, shape.vocab_size - 1, (1, prompt_tokens))
        measured = floors(weight_matrices(models["glade"]), repeats=20)
        print(f"\ndecoding, {str(dtype).removeprefix('torch.')}: {measured['weights_mb']:.1f} MB of weights per token; "
              f"streaming them: {measured['stream_ms']:.2f} ms (the floor, "
              f"{measured['weights_mb'] / measured['stream_ms']:.0f} GB/s); one row times every matrix: "
              f"{measured['library_matvec_ms']:.2f} ms with F.linear, {measured['fused_matvec_ms']:.2f} ms compiled "
              "as DecodeKernels writes it")
        for variant, model_name in (("gpt2", "gpt2"), ("glade+compile", "glade")):
            run = greedy_generate(variant, models[model_name], prompt_tokens + new_tokens)
            parts = profile_per_unit(lambda: run(prompt, new_tokens), new_tokens, repeats)
            label = "GPT-2 generate()" if variant == "gpt2" else "Glade CompiledDecoder"
            print(f"  {label}: {describe(parts)} ({parts['wall_ms'] / measured['stream_ms']:.1f}x the floor)")


def train_profile(shape, repeats: int, dtype_name: str) -> None:
    from run import with_compiled_glade  # the benchmark's compiled Glade: its attention kernel chosen by timing

    dtype = DTYPES[dtype_name]
    models, choice = with_compiled_glade(build_models(shape), shape.batch, shape.seq_len, dtype, True)
    peak = matmul_peak_flops(dtype, 2048, repeats=10)
    floor_ms = 1e3 * shape.training_flops_per_token() * shape.tokens_per_step / peak
    compute = "bf16 autocast" if dtype_name == "bf16" else "fp32"
    print(f"\ntraining step, {compute}, batch {shape.batch} x {shape.seq_len}: matmul FLOPs at the measured "
          f"{dtype_name} peak ({peak / 1e12:.3f} TFLOP/s): {floor_ms:.0f} ms (the floor); compiled attention: "
          f"{choice.describe()}")
    batch = make_batch(shape)
    for variant, model in (("gpt2", models["gpt2"]), ("glade+compile", torch.compile(models["glade+compile"]))):
        optimizer = make_optimizer(model)
        step = lambda: training_step(model, optimizer, batch, dtype)  # noqa: E731
        parts = profile_per_unit(step, 1, repeats)
        label = "GPT-2" if variant == "gpt2" else "Glade + torch.compile"
        print(f"  {label}: {describe(parts)} ({parts['wall_ms'] / floor_ms:.2f}x the floor)")


def describe(parts: dict[str, float]) -> str:
    details = ", ".join(f"{name} {ms:.2f}" for name, ms in parts.items() if name != "wall_ms")
    return f"{parts['wall_ms']:.2f} ms = {details}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, few repeats")
    parser.add_argument("--only", choices=["decode", "train"], help="one of the two profiles")
    parser.add_argument("--bf16", choices=BF16_CHOICES, default="auto",
                        help="profile bf16 too: auto (default) where the CPU computes it natively, always, never")
    args = parser.parse_args(argv)
    dtypes = measured_dtypes(args.bf16)
    logging.set_verbosity_error()
    # Each kernel of a compiled graph becomes a profiler event of its own (named graph_...).
    torch._inductor.config.cpp.enable_kernel_profile = True
    shape = (QUICK_SHAPES if args.quick else SHAPES)["small"]
    prompt_tokens, new_tokens, repeats = (8, 8, 2) if args.quick else (32, 128, 5)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {shape.n_layer} layers x "
          f"{shape.n_embd}, vocab {shape.vocab_size}; decoding: batch 1, {prompt_tokens}-token prompt, "
          f"{new_tokens} new tokens")
    if args.only in (None, "decode"):
        decode_profile(shape, prompt_tokens, new_tokens, repeats, dtypes)
    if args.only in (None, "train"):
        train_profile(shape, repeats=3 if not args.quick else 1, dtype_name=dtypes[0])


if __name__ == "__main__":
    main()
