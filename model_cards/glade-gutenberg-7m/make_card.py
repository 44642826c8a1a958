"""Assemble model_cards/glade-gutenberg-7m from a finished `glade pretrain` run (see reproduce.sh).

Copies the run's final/ folder, generates the card's samples at the shipped sampling settings, and writes the card
with the data, hardware and baseline comparison that only this recipe knows.
"""

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import glade  # noqa: F401  (registers the architecture)
from glade.training.model_card import read_metrics, write_model_card

PROMPTS = [
    "It was a dark and stormy night",
    "Once upon a time there lived a poor woodcutter",
    "\"I do not know,\" said Elizabeth,",
    "The ship had been three days at sea when",
]
SHIPPED_FILES = [
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "configuration_glade.py", "modeling_glade.py", "metrics.jsonl", "loss_curve.png",
]


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
    return names[0] if names else platform.machine()


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="output dir of the Glade run")
    parser.add_argument("--baseline", required=True, help="output dir of the GPT2LMHeadModel run")
    parser.add_argument("--wall-minutes", type=float, required=True, help="wall time of the whole Glade run")
    parser.add_argument("--glade-minutes", type=float, required=True,
                        help="Glade's wall time to the baseline's last evaluated step")
    parser.add_argument("--baseline-minutes", type=float, required=True,
                        help="the baseline's wall time to its last evaluated step")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)

    for name in SHIPPED_FILES:
        shutil.copy(run / "final" / name, out / name)
    # transformers records where this machine loaded the tokenizer from; that means nothing on the Hub.
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    glade_evals, baseline_evals = evals(out / "metrics.jsonl"), evals(Path(args.baseline) / "metrics.jsonl")
    final, step = glade_evals[max(glade_evals)], max(baseline_evals)
    glade_at, baseline_at = glade_evals[step], baseline_evals[step]
    # The baseline's evaluation nearest to Glade's wall time at the matched step: the equal-time comparison.
    baseline_per_step = args.baseline_minutes / step
    same_time_step = max(s for s in baseline_evals if s * baseline_per_step <= args.glade_minutes)
    details = DETAILS.format(
        cpu=cpu_name(),
        wall=args.wall_minutes, tokens=final["tokens_seen"], bpb=final["val_bpb"],
        step=step, match_tokens=glade_at["tokens_seen"],
        g_min=args.glade_minutes, b_min=args.baseline_minutes, speedup=args.baseline_minutes / args.glade_minutes,
        g_loss=glade_at["val_loss"], g_bpb=glade_at["val_bpb"],
        b_loss=baseline_at["val_loss"], b_bpb=baseline_at["val_bpb"],
        t_step=same_time_step, t_loss=baseline_evals[same_time_step]["val_loss"],
        t_bpb=baseline_evals[same_time_step]["val_bpb"],
        baseline_extent=(
            f"To fit the session it was stopped after its evaluation at step {step}; compared there:"
            if step < max(glade_evals) else "It ran the same number of steps:"
        ),
    )
    write_model_card(
        out,
        out / "metrics.jsonl",
        model_name="glade-gutenberg-7m",
        license="apache-2.0",
        language="en",
        training_args=TRAINING_ARGS,
        sample_generations=samples(out),
        loss_curve_png=out / "loss_curve.png",
        details=details,
        limitations=LIMITATIONS,
    )
    print(f"wrote {out}/README.md: validation {final['val_bpb']:.4f} bits per byte")


TRAINING_ARGS = {
    "architecture": "6 layers, 4 heads, 256 wide, context 256, tied head, no dropout",
    "optimizer": "AdamW (beta 0.9 / 0.95, weight decay 0.1 except biases, LayerNorms, embeddings), grad clip 1.0",
    "schedule": "150 warmup steps, cosine from 1e-3 to 1e-4 over 2,000 steps",
    "batch": "16 x 256 tokens per step (4,096 tokens), 2,000 steps = 8.2M tokens (0.63 epoch)",
    "precision": "bf16 autocast, fp32 weights",
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

`reproduce.sh` in this folder rebuilds the model with one command. The run used `glade pretrain` on a 2-core CPU
(`{cpu}`) with one thread, in bf16 autocast: {tokens:,} tokens in {wall:.0f} minutes of wall time, reaching
**{bpb:.3f} bits per byte** on the held-out books (the project's goal of 1.5 needs a longer run or a bigger model;
general-purpose compressors get about 2.2 to 2.7 on these books). Benchmark and test jobs shared the machine for
much of the run, so the wall times below are upper bounds; both models ran under the same conditions.

Baseline: transformers' own `GPT2LMHeadModel` of the same shape trained side by side on the other core, with the
same tokenizer, data order, hyperparameters, seed and initialisation scheme. {baseline_extent}

| Same token budget: step {step} ({match_tokens:,} tokens) | Validation loss | Bits per byte | Wall time to get there |
|---|---|---|---|
| Glade | {g_loss:.4f} | {g_bpb:.4f} | {g_min:.1f} min |
| transformers GPT2LMHeadModel | {b_loss:.4f} | {b_bpb:.4f} | {b_min:.1f} min |

The two are the same function, so per token they learn alike (the difference is bf16 noise); Glade got there
{speedup:.2f}x sooner. With the same wall-time budget ({g_min:.1f} min), the baseline's last evaluation was at
step {t_step}: {t_loss:.4f} nats, {t_bpb:.4f} bits per byte.
"""

LIMITATIONS = [
    "Trained on 19th- and early 20th-century fiction: it reproduces that era's attitudes, including racist, sexist, "
    "colonial and class prejudice, archaic spellings and dialect as the authors wrote them.",
    "At 7M parameters and 8.2M training tokens it is a demonstration model: it writes English words, punctuation and "
    "dialogue in the books' style, but many sentences are ungrammatical and it loses the thread within a paragraph.",
]

if __name__ == "__main__":
    main()
