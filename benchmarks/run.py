"""Glade against transformers' GPT-2 (and a nanoGPT-style model), same configs, same weights, one process, one run.

    python benchmarks/run.py                      # everything, ~6 minutes on 2 idle cores, 10-12 under load
    python benchmarks/run.py --only train-small   # one section while developing
    python benchmarks/run.py --quick --json out.json
    (the full run ends with benchmarks/decoding.py's table: the shipped model on every decoding route, ~3 minutes)

Every timed call alternates between contestants (A B C, B C A, ...) after warm-up, and the table shows medians and the
ratio Glade/GPT-2 of those medians. Training-throughput rows also get MFU against a matmul peak measured at the start
and at the end of the same run. Peak memory is measured one contestant per fresh subprocess (see memory_probe.py).
Method and results: docs/benchmarks.md.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers.utils import logging

from glade.hardware import bf16_support
from glade.training.kernel_choice import KernelChoice, choose_kernel

import decoding
from models import (
    QUICK_SHAPES,
    SHAPES,
    Shape,
    build_models,
    greedy_generate,
    make_batch,
    make_optimizer,
    prefill,
    training_step,
)
from timing import (
    BF16_CHOICES,
    Samples,
    alternate,
    load_average,
    machine_info,
    matmul_peak_flops,
    measured_dtypes,
    thread_info,
)

SECTIONS = ("train-small", "train-124m", "generate", "prefill", "memory", "decoding")
COLUMNS = ("gpt2", "glade", "glade+compile", "nanogpt", "nanogpt+compile")
GLADE_VARIANTS = ("glade", "glade+compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What each training row runs, by shape, for the dtype that `glade pretrain` trains in on this machine (bf16 where the
# CPU computes it natively, else fp32) and for the other one. The other dtype and the 124M shape leave out some columns
# to keep a full run near 10 minutes.
TRAIN_VARIANTS = {
    ("small", "default"): COLUMNS,
    ("small", "other"): ("gpt2", "glade", "nanogpt"),
    ("124m", "default"): ("gpt2", "glade", "glade+compile"),
    ("124m", "other"): ("gpt2", "glade"),
}
MEMORY_VARIANTS = ("gpt2", "glade", "nanogpt")


@dataclass
class Settings:
    """How much each section measures: the full run, or `--quick`'s CI-sized version."""

    shapes: dict[str, Shape]
    warmup: int
    repeats: dict[str, int]
    compile: bool
    prompt_tokens: int = 32
    new_tokens: int = 128
    # (dtype, batch) of each generation row: the model's weights are in that dtype, as a user would load them.
    generate_runs: tuple[tuple[str, int], ...] = (("fp32", 1), ("bf16", 1), ("fp32", 8))
    prefill_tokens: int = 512
    peak_size: int = 2048
    memory_shapes: tuple[str, ...] = ("small", "124m")
    # The dtypes measured, the default first: bf16 leads where the CPU computes it natively (and is left out where it
    # would be emulated, unless asked for), as in `glade pretrain --mixed-precision auto`.
    dtypes: tuple[str, ...] = ("fp32",)

    @property
    def default_dtype(self) -> torch.dtype:
        return DTYPES[self.dtypes[0]]

    @classmethod
    def full(cls, compile: bool, dtypes: tuple[str, ...]) -> "Settings":
        return cls(
            shapes=SHAPES, warmup=1, compile=compile, dtypes=dtypes,
            # A 124M fp32 step takes ~15 s here: two of them per contestant keep the full run near 10 minutes.
            repeats={"train-small": 5, "train-124m": 3, "train-124m-fp32": 2, "generate": 5, "prefill": 5},
        )

    @classmethod
    def quick(cls, dtypes: tuple[str, ...]) -> "Settings":
        # Compilation alone takes tens of seconds, so the quick run measures eager variants only.
        return cls(
            shapes=QUICK_SHAPES, warmup=1, compile=False, repeats=dict.fromkeys(SECTIONS, 1), prompt_tokens=8,
            new_tokens=8, prefill_tokens=64, peak_size=256, memory_shapes=("small",), dtypes=dtypes,
        )

    def generate_runs_measured(self) -> tuple[tuple[str, int], ...]:
        return tuple(run for run in self.generate_runs if run[0] in self.dtypes)

    def variants(self, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(name for name in names if self.compile or not name.endswith("+compile"))


@dataclass
class Row:
    """One benchmark line: a value per contestant (median over alternating runs), and how they were obtained."""

    name: str
    unit: str
    higher_is_better: bool
    values: dict[str, float]
    ratios: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.ratios and "gpt2" in self.values:
            self.ratios = {
                f"{name}/gpt2": self.values[name] / self.values["gpt2"]
                for name in GLADE_VARIANTS
                if name in self.values
            }


def samples_detail(samples: dict[str, Samples]) -> dict:
    return {"samples": {name: asdict(sample) for name, sample in samples.items()}}


def maybe_compiled(variant: str, model: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(model) if variant.endswith("+compile") else model


def with_compiled_glade(
    models: dict[str, torch.nn.Module], batch_size: int, seq_len: int, dtype: torch.dtype, training: bool
) -> tuple[dict[str, torch.nn.Module], KernelChoice]:
    """Compiled Glade runs whole sequences with the attention kernel that `glade pretrain --compile` would choose on
    this CPU: sdpa or `glade_block`, whichever a compiled layer runs faster at this shape (docs/benchmarks.md). It gets
    its own copy of the weights so that eager Glade keeps sdpa."""
    glade = models["glade"]
    choice = choose_kernel(glade.config, batch_size, seq_len, dtype, backward=training)
    compiled_glade = copy.deepcopy(glade)
    compiled_glade.set_attn_implementation(choice.implementation)
    return {**models, "glade+compile": compiled_glade}, choice


def matmul_peaks(settings: Settings) -> dict[str, float]:
    """Matmul TFLOP/s of each measured dtype on this machine, now: the denominators of MFU."""
    return {
        name: matmul_peak_flops(DTYPES[name], settings.peak_size, repeats=10) / 1e12 for name in settings.dtypes
    }


def train_rows(shape_name: str, settings: Settings) -> list[Row]:
    shape = settings.shapes[shape_name]
    models, choice = build_models(shape), None
    if settings.compile:
        models, choice = with_compiled_glade(models, shape.batch, shape.seq_len, settings.default_dtype, training=True)
    optimizers = {name: make_optimizer(model) for name, model in models.items()}
    batch = make_batch(shape)
    rows = []
    for dtype_name in settings.dtypes:
        dtype = DTYPES[dtype_name]
        role = "default" if dtype == settings.default_dtype else "other"
        variants = settings.variants(TRAIN_VARIANTS[shape_name, role])
        calls = {}
        for variant in variants:
            name = variant if variant in models else variant.removesuffix("+compile")
            calls[variant] = partial(
                training_step, maybe_compiled(variant, models[name]), optimizers[name], batch, dtype
            )
        name = f"train-{shape_name}-{dtype_name}"
        repeats = settings.repeats.get(name, settings.repeats[f"train-{shape_name}"])
        samples = alternate(calls, settings.warmup, repeats, name)
        details = {
            "shape": shape.as_dict(), "dtype": dtype_name, "flops_per_token": shape.training_flops_per_token(),
            **samples_detail(samples),
        }
        if "glade+compile" in samples:
            details["compiled_attention"] = choice.describe()
        tokens_per_s = {v: shape.tokens_per_step / s.median_wall_s for v, s in samples.items()}
        rows.append(Row(name, "tokens/s", True, tokens_per_s, details=details))
    return rows


def mfu_row(row: Row, peaks: dict[str, float]) -> Row:
    """Model FLOPs utilisation of a training row: achieved matmul FLOP/s over the measured peak of its dtype."""
    flops_per_token, peak = row.details["flops_per_token"], peaks[row.details["dtype"]]
    mfu = {v: 100 * rate * flops_per_token / (peak * 1e12) for v, rate in row.values.items()}
    return Row(f"{row.name}-mfu", "% of peak", True, mfu, details={"flops_per_token": flops_per_token,
                                                                    "peak_tflops": peak})


def generate_rows(settings: Settings) -> list[Row]:
    shape = settings.shapes["small"]
    variants = settings.variants(("gpt2", "glade", "glade+compile"))
    max_length = settings.prompt_tokens + settings.new_tokens
    rows = []
    for dtype_name, batch_size in settings.generate_runs_measured():
        dtype = DTYPES[dtype_name]
        models = {name: model.eval().to(dtype) for name, model in build_models(shape).items() if name != "nanogpt"}
        generators = {v: greedy_generate(v, models[v.removesuffix("+compile")], max_length) for v in variants}
        prompt = torch.randint(0, shape.vocab_size - 1, (batch_size, settings.prompt_tokens))
        outputs = {}

        def call(variant: str) -> None:
            outputs[variant] = generators[variant](prompt, settings.new_tokens)

        calls = {v: partial(call, v) for v in variants}
        name = f"generate-b{batch_size}" + ("" if dtype_name == "fp32" else f"-{dtype_name}")
        samples = alternate(calls, settings.warmup, settings.repeats["generate"], name)
        new_tokens = batch_size * settings.new_tokens
        rows.append(
            Row(
                name, "tokens/s", True, {v: new_tokens / s.median_wall_s for v, s in samples.items()},
                details={
                    "dtype": dtype_name, "prompt_tokens": settings.prompt_tokens, "new_tokens": settings.new_tokens,
                    "tokens_identical_to_gpt2": {v: torch.equal(outputs[v], outputs["gpt2"]) for v in variants},
                    "token_agreement_with_gpt2": {
                        v: (outputs[v] == outputs["gpt2"]).float().mean().item() for v in variants
                    },
                    **samples_detail(samples),
                },
            )
        )
    return rows


def prefill_rows(settings: Settings) -> list[Row]:
    shape = settings.shapes["small"]
    models, choice = build_models(shape), None
    if settings.compile:
        models, choice = with_compiled_glade(models, 1, settings.prefill_tokens, torch.float32, training=False)
    models = {name: model.eval() for name, model in models.items()}
    prompt = torch.randint(0, shape.vocab_size, (1, settings.prefill_tokens))
    variants = settings.variants(COLUMNS)
    calls = {v: partial(prefill, maybe_compiled(v, models.get(v, models[v.removesuffix("+compile")])), prompt)
             for v in variants}
    with torch.no_grad():
        samples = alternate(calls, settings.warmup, settings.repeats["prefill"], "prefill")
    return [
        Row(
            f"prefill-{settings.prefill_tokens}", "ms", False, {v: 1e3 * s.median_wall_s for v, s in samples.items()},
            details={"prompt_tokens": settings.prefill_tokens, **samples_detail(samples),
                     **({"compiled_attention": choice.describe()} if "glade+compile" in samples else {})},
        )
    ]


def probe_memory(variant: str, shape_name: str, dtype: str, quick: bool, threads: int) -> dict:
    probe = Path(__file__).with_name("memory_probe.py")
    command = [sys.executable, str(probe), "--variant", variant, "--shape", shape_name, "--dtype", dtype]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    result = subprocess.run(command + (["--quick"] if quick else []), env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {variant}/{shape_name} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_rows(settings: Settings, quick: bool, threads: int) -> list[Row]:
    jobs = [(variant, shape) for shape in settings.memory_shapes for variant in MEMORY_VARIANTS]
    # Probes measure memory, not time, so they may share the cores; each one's peak is its own process's.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        probes = list(pool.map(lambda job: probe_memory(*job, settings.dtypes[0], quick, threads), jobs))
    results = dict(zip(jobs, probes))
    return [
        Row(
            f"memory-train-{shape}-{settings.dtypes[0]}", "MiB", False,
            {variant: results[variant, shape]["peak_mib"] for variant in MEMORY_VARIANTS},
            details={variant: results[variant, shape] for variant in MEMORY_VARIANTS},
        )
        for shape in settings.memory_shapes
    ]


def best_glade(row: Row) -> str:
    pick = max if row.higher_is_better else min
    return pick((v for v in GLADE_VARIANTS if v in row.values), key=row.values.__getitem__)


def speedup(row: Row, variant: str, reference: str = "gpt2") -> float:
    """How many times faster `variant` is than `reference` on this row (ms and MiB rows: lower is better)."""
    ratio = row.values[variant] / row.values[reference]
    return ratio if row.higher_is_better else 1 / ratio


def goals(rows: dict[str, Row]) -> list[dict]:
    """The goals of the speed issues, each judged on the best Glade variant of its row (named in the result)."""
    results = []

    def judge(goal: str, row_name: str, target: float, measure=speedup, extra_check=lambda row, variant: (True, ""),
              at_most: bool = False, variant: str | None = None):
        row = rows.get(row_name)
        if row is None:
            return
        variant = variant or best_glade(row)
        measured = measure(row, variant)
        extra_ok, note = extra_check(row, variant)
        results.append(
            {"goal": goal, "row": row_name, "variant": variant, "measured": measured, "target": target,
             "met": bool((measured <= target if at_most else measured >= target) and extra_ok), "note": note}
        )

    def at_least_nanogpt_compiled(row: Row, variant: str) -> tuple[bool, str]:
        reference = row.values.get("nanogpt+compile")
        if reference is None:
            return True, "nanogpt+compile not measured"
        return row.values[variant] >= reference, f"nanogpt+compile/gpt2 = {reference / row.values['gpt2']:.2f}"

    def same_tokens(row: Row, variant: str) -> tuple[bool, str]:
        identical = row.details["tokens_identical_to_gpt2"][variant]
        return identical, "tokens identical to GPT-2" if identical else "tokens DIFFER from GPT-2"

    def agreement(row: Row, variant: str) -> tuple[bool, str]:
        return True, f"{100 * row.details['token_agreement_with_gpt2'][variant]:.0f}% of tokens equal GPT-2's"

    for name, row in rows.items():
        if "glade+compile" in row.values and "glade" in row.values and not name.endswith("-mfu"):
            measured = speedup(row, "glade+compile", "glade")
            results.append(
                {"goal": f"compiled >= eager ({name})", "row": name, "variant": "glade+compile",
                 "measured": measured, "target": 1.0, "met": measured >= 1.0, "note": "glade+compile / glade"}
            )
    judge("train small bf16 >= 1.5x GPT-2 and >= nanoGPT+compile", "train-small-bf16", 1.5,
          extra_check=at_least_nanogpt_compiled)
    judge("train 124M bf16 >= 1.3x GPT-2", "train-124m-bf16", 1.3)
    judge("train 124M bf16 MFU >= 35% of measured bf16 matmul peak", "train-124m-bf16-mfu", 35.0,
          lambda row, variant: row.values[variant])
    judge("train small fp32 eager >= 1.3x GPT-2", "train-small-fp32", 1.3, variant="glade")
    judge("greedy decode batch 1 fp32 >= 3x GPT-2, token-identical", "generate-b1", 3.0, extra_check=same_tokens)
    judge("greedy decode batch 1 bf16 >= 3x GPT-2 in bf16", "generate-b1-bf16", 3.0, extra_check=agreement)
    for name in rows:
        if name.startswith("memory-"):
            judge(f"training peak memory <= 0.75x GPT-2 ({name})", name, 0.75,
                  lambda row, variant: row.values[variant] / row.values["gpt2"], at_most=True)
    return results


def format_table(rows: list[Row]) -> str:
    columns = [c for c in COLUMNS if any(c in row.values for row in rows)]
    ratio_columns = [f"{v}/gpt2" for v in GLADE_VARIANTS if any(f"{v}/gpt2" in row.ratios for row in rows)]
    header = ["benchmark", "unit", *columns, *ratio_columns]
    lines = [header]
    for row in rows:
        cells = [row.name, row.unit]
        cells += [f"{row.values[c]:,.1f}" if c in row.values else "-" for c in columns]
        cells += [f"{row.ratios[c]:.2f}x" if c in row.ratios else "-" for c in ratio_columns]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                for line in lines]
    rendered.insert(1, "-" * len(rendered[0]))
    return "\n".join(rendered)


def write_json(path: Path, report: dict) -> None:
    partial_path = path.with_name(path.name + ".partial")
    partial_path.write_text(json.dumps(report, indent=2) + "\n")
    partial_path.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one timed run each, no compilation")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                        help=f"run only these sections: {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    parser.add_argument("--bf16", choices=BF16_CHOICES, default="auto",
                        help="measure bf16 rows: auto (default) where the CPU computes bf16 natively (avx512_bf16, "
                             "amx_bf16, arm64 bf16), always (emulated elsewhere, and slow), never")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # transformers warns about GPT-2's unset loss_type on every model; the table is the output that matters.
    logging.set_verbosity_error()
    dtypes = measured_dtypes(args.bf16)
    if "bf16" not in dtypes:
        print(f"bf16 rows left out: {bf16_support(torch.device('cpu'))} (--bf16 always measures them anyway)")
    settings = Settings.quick(dtypes) if args.quick else Settings.full(not args.no_compile, dtypes)
    started, load_before = time.perf_counter(), load_average()

    first_peaks = matmul_peaks(settings)
    rows: list[Row] = []
    decoding_report = None
    for section in args.only:
        if section.startswith("train-"):
            rows += train_rows(section.removeprefix("train-"), settings)
        elif section == "generate":
            rows += generate_rows(settings)
        elif section == "prefill":
            rows += prefill_rows(settings)
        elif section == "memory":
            rows += memory_rows(settings, args.quick, args.threads)
        elif section == "decoding" and not args.quick:  # the shipped model on every decoding route: decoding.py
            decoding_report = decoding.main(["--threads", str(args.threads), "--repeats", "3"])
    # Load from elsewhere can only lower a peak, so the better of a measurement before and after is kept.
    last_peaks = matmul_peaks(settings)
    peaks = {name: max(first_peaks[name], last_peaks[name]) for name in settings.dtypes}
    rows = [line for row in rows for line in ([row, mfu_row(row, peaks)] if row.name.startswith("train-") else [row])]

    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick,
        "machine": machine_info(),
        "threads": thread_info(),
        "load_average": {"before": load_before, "after": load_average()},
        "duration_s": time.perf_counter() - started,
        "matmul_peak_tflops": peaks,
        "matmul_peak_tflops_measurements": {"before": first_peaks, "after": last_peaks},
        "rows": [asdict(row) for row in rows],
        "goals": goals({row.name: row for row in rows}),
        "decoding": decoding_report,
    }
    print(format_table(rows))
    print(f"\nmatmul peak: {', '.join(f'{name} {peak:.3f}' for name, peak in peaks.items())} TFLOP/s; "
          f"threads {report['threads']}; load average {load_before} -> {report['load_average']['after']}; "
          f"{report['duration_s']:.0f} s")
    for row in rows:
        if "compiled_attention" in row.details:
            print(f"compiled attention for {row.name} on {report['machine']['cpu_model']}: "
                  f"{row.details['compiled_attention']}")
    for goal in report["goals"]:
        print(f"[{'met' if goal['met'] else 'NOT met'}] {goal['goal']}: {goal['variant']} {goal['measured']:.2f} "
              f"(target {goal['target']}) {goal['note']}")
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
