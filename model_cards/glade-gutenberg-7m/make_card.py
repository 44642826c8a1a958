"""Assemble model_cards/glade-gutenberg-7m from a finished `glade pretrain` run (see reproduce.sh).

Copies the run's final/ folder, generates the card's samples at the shipped sampling settings, and writes the card
with the data, hardware and baseline comparison that only this recipe knows.
"""

import argparse
import shutil
from pathlib import Path

import torch
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import glade  # noqa: F401  (registers the architecture)
from glade.atomic import save_figure
from glade.hardware import cpu_name
from glade.training.metrics import read_metrics
from glade.training.model_card import write_model_card

PROMPTS = [
    "It was a dark and stormy night",
    "Once upon a time there lived a poor woodcutter",
    "\"I do not know,\" said Elizabeth,",
    "The ship had been three days at sea when",
]
SHIPPED_FILES = [
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "configuration_glade.py", "modeling_glade.py", "kernels_glade.py", "metrics.jsonl", "loss_curve.png",
]


def evals(metrics: Path) -> dict[int, dict]:
    return {record["step"]: record for record in read_metrics(metrics) if "val_loss" in record}


def samples(model_dir: Path) -> list[tuple[str, dict, str]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    settings = {k: v for k, v in model.generation_config.to_diff_dict().items() if k in
                ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "repetition_penalty")}
    results = []
    for seed, prompt in enumerate(PROMPTS):
        torch.manual_seed(seed)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        output = model.generate(ids, attention_mask=torch.ones_like(ids))
        results.append((prompt, {**settings, "seed": seed}, tokenizer.decode(output[0], skip_special_tokens=True)))
    return results


def plot_comparison(glade_evals: dict[int, dict], baseline_evals: dict[int, dict], png_path: Path) -> None:
    figure = Figure(figsize=(7, 4.5), dpi=120)
    axes = figure.subplots()
    for name, records in (("Glade", glade_evals), ("transformers GPT2LMHeadModel", baseline_evals)):
        points = sorted((r["tokens_seen"] / 1e6, r["val_bpb"]) for r in records.values())
        axes.plot(*zip(*points), "o-", label=name, linewidth=1.5, markersize=4)
    axes.set_xlabel("training tokens (millions)")
    axes.set_ylabel("validation bits per byte")
    axes.set_title("Same wall-clock budget, one CPU core each")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    save_figure(figure, png_path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="output dir of the Glade run")
    parser.add_argument("--baseline", required=True, help="output dir of the GPT2LMHeadModel run")
    parser.add_argument("--glade-minutes", type=float, required=True, help="wall time of the whole Glade run")
    parser.add_argument("--baseline-minutes", type=float, required=True, help="wall time of the whole baseline run")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)

    for name in SHIPPED_FILES:
        shutil.copy(run / "final" / name, out / name)
    shutil.copy(Path(args.baseline) / "metrics.jsonl", out / "baseline_metrics.jsonl")
    generation_config = GenerationConfig.from_pretrained(out)
    generation_config.update(**SAMPLING)
    generation_config.save_pretrained(out)
    glade_evals, baseline_evals = evals(out / "metrics.jsonl"), evals(out / "baseline_metrics.jsonl")
    plot_comparison(glade_evals, baseline_evals, out / "baseline_comparison.png")
    glade_final, baseline_final = glade_evals[max(glade_evals)], baseline_evals[max(baseline_evals)]
    step = max(set(glade_evals) & set(baseline_evals) - {max(glade_evals)})
    details = DETAILS.format(
        cpu=cpu_name(),
        g_steps=glade_final["step"], g_tokens=glade_final["tokens_seen"], g_min=args.glade_minutes,
        g_loss=glade_final["val_loss"], g_bpb=glade_final["val_bpb"],
        b_steps=baseline_final["step"], b_tokens=baseline_final["tokens_seen"], b_min=args.baseline_minutes,
        b_loss=baseline_final["val_loss"], b_bpb=baseline_final["val_bpb"],
        gain=baseline_final["val_bpb"] - glade_final["val_bpb"],
        step=step, step_tokens=glade_evals[step]["tokens_seen"],
        gs_loss=glade_evals[step]["val_loss"], gs_bpb=glade_evals[step]["val_bpb"],
        bs_loss=baseline_evals[step]["val_loss"], bs_bpb=baseline_evals[step]["val_bpb"],
        epochs=glade_final["tokens_seen"] / TRAIN_TOKENS,
    )
    training_args = {**TRAINING_ARGS, "batch": TRAINING_ARGS["batch"].format(
        steps=glade_final["step"], tokens=glade_final["tokens_seen"] / 1e6, epochs=glade_final["tokens_seen"] / TRAIN_TOKENS)}
    write_model_card(
        out,
        out / "metrics.jsonl",
        model_name="glade-gutenberg-7m",
        license="apache-2.0",
        language="en",
        training_args=training_args,
        sample_generations=samples(out),
        loss_curve_png=out / "loss_curve.png",
        details=details,
        limitations=LIMITATIONS,
    )
    print(f"wrote {out}/README.md: validation {glade_final['val_bpb']:.4f} bits per byte")


# Chosen by reading samples of the finished model: below 0.8 / top-50 it stays on topic, and the penalty stops the
# loops ("the door opened the door opened") that a model this small falls into.
SAMPLING = dict(do_sample=True, temperature=0.6, top_k=40, repetition_penalty=1.15, max_new_tokens=100)
TRAIN_TOKENS = 12_984_582  # children.txt + fiction.txt under this tokenizer

TRAINING_ARGS = {
    "architecture": "6 layers, 4 heads, 256 wide, context 256, tied head, no dropout",
    "optimizer": "AdamW (beta 0.9 / 0.95, weight decay 0.1 except biases, LayerNorms, embeddings), grad clip 1.0",
    "schedule": "200 warmup steps, cosine from 2e-3 to 1e-4",
    "batch": "16 x 256 tokens per step (4,096 tokens), {steps:,} steps = {tokens:.1f}M tokens ({epochs:.2f} epochs)",
    "precision": "bf16 autocast, fp32 weights, torch.compile",
    "seed": 1337,
}

DETAILS = """## Data

Trained on `children.txt` and `fiction.txt` of the project's Gutenberg corpus (71 public-domain English books from
Project Gutenberg: Alice, Oz, Grimm, Tom Sawyer, Little Women, Austen, Dickens, the Brontes, Tolstoy and
Dostoyevsky in Garnett's translations, Dumas, Hugo, Melville, Doyle, Stoker, Shakespeare, Homer and more; 49.8 MB,
about 13M tokens). The books are in the public domain in the USA, and their authors and translators died before
1955; Project Gutenberg's licence boilerplate was removed, so the texts are plain public-domain text. Validation uses
two books held out of training (*The Legend of Sleepy Hollow*, *The Time Machine*; 249,731 bytes).

## Tokenizer

A byte-level BPE with 8,192 tokens trained on the same two training files with `glade train-tokenizer`
(`<|endoftext|>` is bos, eos and pad; any text is encodable). It averages 3.9 bytes per token on the validation
books.

## Training run and baseline

`reproduce.sh` in this folder rebuilds the model with one command. The run used `glade pretrain --compile` on a
2-core CPU (`{cpu}`) with one thread, in bf16 autocast: {g_tokens:,} tokens ({epochs:.2f} epochs) in {g_min:.0f}
minutes of wall time, reaching **{g_bpb:.3f} bits per byte** on the held-out books. The project's goal of 1.5 is out
of reach of this budget (the first release, trained on 8.2M tokens at half the learning rate, reached 1.772); it
needs a bigger model trained on several times more tokens. General-purpose compressors get about 2.2 to 2.7 on these
books.

Baseline: transformers' own `GPT2LMHeadModel` of the same shape, trained side by side on the other core with the
same budget of wall-clock time, tokenizer, data order, hyperparameters, seed and initialisation scheme, and also
compiled. Each run's step count was set from the two models' measured speeds so that both fill the same time, and
each has its own full learning-rate schedule. `baseline_metrics.jsonl` is its training log.

| Same wall-clock budget | Steps | Tokens | Wall time | Validation loss | Bits per byte |
|---|---|---|---|---|---|
| Glade | {g_steps:,} | {g_tokens:,} | {g_min:.0f} min | {g_loss:.4f} | **{g_bpb:.4f}** |
| transformers GPT2LMHeadModel | {b_steps:,} | {b_tokens:,} | {b_min:.0f} min | {b_loss:.4f} | {b_bpb:.4f} |

Glade ends {gain:.3f} bits per byte lower because it trains faster (fused loss and block causal attention under
`torch.compile`), so the same time buys more tokens. Per token the two learn alike, as they should: they compute the
same function. At step {step} ({step_tokens:,} tokens), where both runs evaluated, Glade was at {gs_loss:.4f} nats
({gs_bpb:.4f} bpb) and the baseline at {bs_loss:.4f} ({bs_bpb:.4f}); the schedules differ slightly there, since each
decays over its own length.

![Validation bits per byte of both runs](baseline_comparison.png)
"""

LIMITATIONS = [
    "Trained on 19th- and early 20th-century fiction: it reproduces that era's attitudes, including racist, sexist, "
    "colonial and class prejudice, archaic spellings and dialect as the authors wrote them.",
    "At 7M parameters and about 15M training tokens it is a demonstration model: it writes narration and dialogue in "
    "the books' style, mostly grammatical sentence by sentence, but the sense drifts, names change, and it loses the "
    "thread within a paragraph.",
]

if __name__ == "__main__":
    main()
