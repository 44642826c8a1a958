"""Ablation of the modern training recipe: GPT-2 + AdamW against each modern option alone, Muon, and their combination.

    python benchmarks/recipe_ablation.py --data ../shared/data/gutenberg-en --out docs/recipe
    # v2, at the shipped model's shape and budget, each option at three learning rates:
    python benchmarks/recipe_ablation.py --data ../shared/data/gutenberg-en --out docs/recipe-v2 --shape shipped \
        --train-files children.txt fiction.txt nonfiction.txt --steps 3000 --lr-factors 0.5 1 2 --seeds 1337 1338 1339

Every row trains the same shape on the same tokens (same data order per seed) with `glade pretrain`, two runs side by
side with one thread each, and is scored by validation bits per byte on held-out books. Phase 1 tunes the AdamW
baseline's learning rate; phase 2 runs each option alone on top of it (model options, and training options: a weight
average, per-epoch document shuffling, a weight-decay schedule, a batch ramp), and each option again on top of Muon,
with Muon's own refinements (Polar Express, NorMuon, cautious weight decay) only there; every option runs at the
baseline's best lr times each of --lr-factors, and counts at its best. Phase 3 combines Muon (if it helped) with every
option that lowered its bpb by more than the spread over seeds (the better of relu2 and swiglu), and that combination
is the recipe; every option at once is run too, for comparison. The baseline and the recipe are then timed under
--compile. Writes `results.json`, `table.md` and `bpb_vs_tokens.png` to --out and prints the table. Finished runs
in --work are reused. On 2 CPU cores the tiny default budget (one lr per option, 1.2M tokens per run, then short
speed runs) takes about 3 hours; the shipped shape's takes days on a CPU, hours on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SHAPES = {
    "tiny": {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 256},  # glade-tiny
    "shipped": {"n_layer": 6, "n_embd": 256, "n_head": 4, "n_positions": 256},  # glade-gutenberg-7m
}
BASELINE_LRS = (1e-3, 2e-3, 4e-3, 8e-3)
SPEED_LOG_EVERY = 10
# Option keys that are `glade pretrain` flags; every other key is a GladeConfig field. `batch_ramp_fraction` is this
# script's: --batch-ramp-steps as a fraction of the run's steps.
TRAINING_FLAGS = ("optimizer", "polar_express", "normuon", "cautious_weight_decay", "weight_decay_schedule",
                  "ema_decay", "shuffle_documents", "batch_size", "grad_accum", "batch_ramp_fraction")
# Each modern option alone, as GladeConfig fields or training flags.
OPTIONS: dict[str, dict] = {
    "muon": {"optimizer": "muon"},
    "rotary": {"positions": "rotary"},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk_norm": {"qk_norm": True},
    "relu2": {"activation_function": "relu2"},
    "swiglu": {"activation_function": "swiglu"},
    "gqa": {"n_kv_head": 2},
    "softcap": {"logit_softcap": 15.0},
    "zero_init_untied": {"zero_init": True, "tie_word_embeddings": False},
    "no_bias": {"bias": False},
    "residual_lambdas": {"residual_lambdas": True},
    "value_embeddings": {"value_embeddings": True},
    "ema": {"ema_decay": 0.99},
    "shuffle_documents": {"shuffle_documents": True},
    "wd_schedule": {"weight_decay_schedule": "linear"},
    # The same 16 blocks per step at full size, in two micro-batches, from one over the first 30% of the steps.
    "batch_ramp": {"batch_size": 8, "grad_accum": 2, "batch_ramp_fraction": 0.3},
}
# Refinements of Muon: they run on top of it only.
MUON_OPTIONS: dict[str, dict] = {
    "polar_express": {"polar_express": True},
    "normuon": {"normuon": True},
    "cautious_wd": {"cautious_weight_decay": True},
}
ACTIVATIONS = ("relu2", "swiglu")  # mutually exclusive: the recipe takes the better one


@dataclass
class Row:
    name: str
    options: dict
    lr: float
    steps: int | None = None  # None: --steps
    runs: list[dict] = field(default_factory=list)

    @property
    def final_bpb(self) -> list[float]:
        return [run["curve"][-1][1] for run in self.runs]

    @property
    def mean_bpb(self) -> float:
        return statistics.mean(self.final_bpb)

    @property
    def spread(self) -> float:
        """Half the range over seeds."""
        return (max(self.final_bpb) - min(self.final_bpb)) / 2

    def mean_curve(self) -> np.ndarray:
        """[[tokens, bpb], ...] averaged over seeds."""
        return np.mean([run["curve"] for run in self.runs], axis=0)


def model_fields(options: dict) -> dict:
    return {key: value for key, value in options.items() if key not in TRAINING_FLAGS}


def training_flags(options: dict, steps: int) -> list[str]:
    """`glade pretrain` flags for an option's training keys (a 16-block batch and AdamW unless it sets others)."""
    flags = {"optimizer": "adamw", "batch_size": 16} | {k: v for k, v in options.items() if k in TRAINING_FLAGS}
    if (fraction := flags.pop("batch_ramp_fraction", None)) is not None:
        flags["batch_ramp_steps"] = max(1, round(fraction * steps))
    words = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return words


def read_run(output_dir: Path) -> dict:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    curve = [[r["tokens_seen"], r["val_bpb"]] for r in records if "val_bpb" in r]
    # The first log interval includes warm-up work (allocation, first kernels, compilation): leave it out of the rate.
    steady = train[1:] or train
    return {"curve": curve, "tokens_per_sec": statistics.mean(r["tokens_per_sec"] for r in steady)}


def train(row: Row, seed: int, args: argparse.Namespace, speed: str | None = None) -> dict:
    """One run of `row` (reused when it already finished); `speed` ("eager" or "compiled"): a short run that only
    measures tokens/s."""
    output = args.work / f"{row.name}-lr{row.lr:g}-seed{seed}{f'-{speed}' if speed else ''}"
    steps = args.speed_steps if speed else row.steps or args.steps
    compiled = speed == "compiled"
    if not (output / "final").is_dir():
        config = args.work / f"{output.name}.json"
        config.write_text(json.dumps({**SHAPES[args.shape], **model_fields(row.options)}))
        command = [
            "glade", "pretrain", "--config", str(config),
            "--data", *(str(args.data / name) for name in args.train_files), "--val-data", str(args.data / "valid.txt"),
            "--tokenizer", str(args.tokenizer), "--output-dir", str(output), "--cache-dir", str(args.work / "cache"),
            "--max-steps", str(steps), "--block-size", "256", "--lr", str(row.lr),
            # Speed runs evaluate only after their last log line: an evaluation inside a log window would count
            # as training time.
            "--eval-every", "0" if speed else str(args.eval_every), "--eval-batches", "16",
            "--log-every", str(SPEED_LOG_EVERY if speed else args.eval_every),
            "--save-every", "0", "--dropout", "0", "--seed", str(seed), "--mixed-precision", "auto",
            *training_flags(row.options, steps),
        ] + (["--compile"] if compiled else [])
        shutil.rmtree(output, ignore_errors=True)  # an interrupted earlier attempt: start over
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
        log = args.work / f"{output.name}.log"
        with open(log, "w") as file:
            subprocess.run(command, env=env, stdout=file, stderr=subprocess.STDOUT, check=True)
    run = read_run(output)
    print(f"{output.name:>40}: {run['curve'][-1][1]:.4f} bpb, "
          f"{run['tokens_per_sec']:,.0f} tokens/s", flush=True)
    return run


def run_rows(rows: list[Row], args: argparse.Namespace) -> None:
    jobs = [(row, seed) for row in rows for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: train(job[0], job[1], args), jobs))
    for (row, _), run in zip(jobs, results):
        row.runs.append(run)


def speeds(rows: list[Row], args: argparse.Namespace, speed: str) -> dict[str, float]:
    """Tokens/s of each option (its first row: the learning rate does not change the work) in short runs side by
    side, eager or under `--compile` (as `glade pretrain --compile` trains); the first log interval (warm-up,
    compilation) is left out. Measured apart from the ablation's runs, so that the machine's other work then does
    not blur them."""
    first = list({row.name: row for row in reversed(rows)}.values())
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda row: train(row, args.seeds[0], args, speed=speed), first))
    return {row.name: run["tokens_per_sec"] for row, run in zip(first, runs)}


def best_rows(rows: list[Row]) -> dict[str, Row]:
    """Each option's row at its best learning rate."""
    best: dict[str, Row] = {}
    for row in rows:
        if row.name not in best or row.mean_bpb < best[row.name].mean_bpb:
            best[row.name] = row
    return best


def helps(row: Row, baseline: Row) -> bool:
    """Lower validation bpb than the baseline by more than either row's spread over seeds."""
    return row.mean_bpb < baseline.mean_bpb - max(row.spread, baseline.spread)


def tokens_to_reach(curve: np.ndarray, target: float) -> float | None:
    """Tokens at which the curve first reaches `target` bpb, interpolated between evaluations."""
    for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:]):
        if y1 <= target:
            return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1)) if y0 > target else float(x0)
    return None


def table(rows: list[Row], baseline: Row, eager: dict[str, float]) -> str:
    lines = ["| row | val bpb (mean ± half-range) | Δ vs best baseline | tokens/s |", "|---|---|---|---|"]
    for row in rows:
        label = f"{row.name}, lr {row.lr:g}"
        delta = row.mean_bpb - baseline.mean_bpb
        lines.append(f"| {label} | {row.mean_bpb:.4f} ± {row.spread:.4f} | {delta:+.4f} | {eager[row.name]:,.0f} |")
    return "\n".join(lines)


def plot(baseline: Row, recipe: Row, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row, label in ((baseline, "GPT-2 + AdamW"), (recipe, "recipe")):
        for run in row.runs:
            curve = np.array(run["curve"])
            axis.plot(curve[:, 0] / 1e6, curve[:, 1], alpha=0.35, color="C0" if row is baseline else "C1")
        curve = row.mean_curve()
        axis.plot(curve[:, 0] / 1e6, curve[:, 1], label=f"{label} (mean of {len(row.runs)} seeds)",
                  color="C0" if row is baseline else "C1", linewidth=2)
    axis.axhline(baseline.mean_bpb, color="gray", linestyle=":", label="baseline's final bpb")
    axis.set_xlabel("training tokens (millions)")
    axis.set_ylabel("validation bits per byte")
    axis.set_ylim(top=min(axis.get_ylim()[1], baseline.mean_curve()[1, 1]))
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with children.txt and valid.txt")
    parser.add_argument("--tokenizer", type=Path, default=Path("model_cards/glade-gutenberg-7m"))
    parser.add_argument("--out", type=Path, default=Path("docs/recipe"))
    parser.add_argument("--work", type=Path, default=Path("runs/recipe-ablation"), help="runs (reused if complete)")
    parser.add_argument("--shape", choices=SHAPES, default="tiny", help="the model's shape")
    parser.add_argument("--train-files", nargs="+", default=["children.txt"], help="training files in --data")
    parser.add_argument("--lr-factors", type=float, nargs="+", default=[1.0],
                        help="each option runs at the best baseline lr times each of these")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of 16 x 256 tokens per run")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--speed-steps", type=int, default=60, help="steps of the runs that measure tokens/s")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    lr_rows = [Row("gpt2_adamw", {}, lr) for lr in BASELINE_LRS]
    run_rows(lr_rows, args)
    baseline = min(lr_rows, key=lambda row: row.mean_bpb)
    lrs = [baseline.lr * factor for factor in args.lr_factors]
    single = [Row(name, options, lr) for name, options in OPTIONS.items() for lr in lrs]
    run_rows(single, args)
    # The other options again, each alone on top of Muon (its refinements only there): what they add to the
    # optimizer that helps most.
    muon = best_rows(single)["muon"]
    on_muon = [Row(f"muon+{name}", {**muon.options, **options}, lr)
               for name, options in {**OPTIONS, **MUON_OPTIONS}.items() if name != "muon" for lr in lrs]
    run_rows(on_muon, args)
    reference, candidates = (muon, best_rows(on_muon)) if helps(muon, baseline) else (baseline, best_rows(single))
    helpful = [row for row in candidates.values() if helps(row, reference)]
    activations = [row for row in helpful if row.name.endswith(ACTIVATIONS)]
    helpful = [row for row in helpful if row not in activations] + sorted(activations, key=lambda r: r.mean_bpb)[:1]
    recipe = Row("recipe", {k: v for row in [reference, *helpful] for k, v in row.options.items()}, reference.lr)
    # For comparison: every option at once (swiglu as the activation), helpful alone or not.
    everything = Row("all_options", {k: v for name, options in {**OPTIONS, **MUON_OPTIONS}.items() if name != "relu2"
                                     for k, v in options.items()}, reference.lr)
    # The acceptance test itself: the recipe with 0.65x the tokens, on its own (shorter) schedule.
    short = Row("recipe_0.65x_tokens", recipe.options, recipe.lr, steps=round(0.65 * args.steps))
    run_rows([recipe, everything, short], args)
    recipe_options = recipe.options

    rows = [*lr_rows, *single, *on_muon, recipe, everything, short]
    summary = {
        "shape": SHAPES[args.shape], "train_files": args.train_files, "steps": args.steps,
        "seeds": args.seeds, "lr_factors": args.lr_factors,
        "baseline": baseline.name, "baseline_lr": baseline.lr, "recipe_options": recipe_options,
        "tokens_to_baseline_bpb": tokens_to_reach(recipe.mean_curve(), baseline.mean_bpb),
        "baseline_tokens": float(baseline.mean_curve()[-1, 0]),
        "recipe_0.65x_tokens_bpb": short.mean_bpb, "baseline_bpb": baseline.mean_bpb,
        "rows": [{**asdict(row), "mean_bpb": row.mean_bpb, "spread": row.spread} for row in rows],
    }
    eager = speeds(rows, args, "eager")
    compiled = speeds([baseline, recipe], args, "compiled")
    summary["eager_tokens_per_sec"], summary["compiled_tokens_per_sec"] = eager, compiled
    if summary["tokens_to_baseline_bpb"]:
        summary["token_ratio"] = summary["tokens_to_baseline_bpb"] / summary["baseline_tokens"]
        for mode, measured in (("eager", eager), ("compiled", compiled)):
            rate = measured[recipe.name] / measured[baseline.name]
            summary[f"wall_clock_speedup_{mode}"] = rate / summary["token_ratio"]
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    text = table(rows, baseline, eager)
    (args.out / "table.md").write_text(text + "\n")
    plot(baseline, recipe, args.out / "bpb_vs_tokens.png")
    print(text)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
