#!/usr/bin/env bash
# Rebuild glade-gutenberg-7m from the public-domain Gutenberg books with the recipe of docs/recipe.md (Muon + rotary).
# Run from the repository root with glade installed: bash model_cards/glade-gutenberg-7m/reproduce.sh
# DATA defaults to the project's shared corpus. On 2 CPU cores the training run takes about 90 minutes (both cores);
# the tokenizer, the baseline's speed run and the evaluation take a few more. The held-out evaluation with
# lm-evaluation-harness runs when `lm_eval` is installed (pip install "glade[eval]").
set -euo pipefail
DATA=${DATA:-../shared/data/gutenberg-en}
RUNS=${RUNS:-runs}
HERE=model_cards/glade-gutenberg-7m
STEPS=${STEPS:-8500}

glade train-tokenizer --data "$DATA/children.txt" "$DATA/fiction.txt" --vocab-size 8192 --output-dir "$RUNS/gutenberg-tokenizer"

COMMON=(--dropout 0 --data "$DATA/children.txt" "$DATA/fiction.txt" "$DATA/nonfiction.txt" --val-data "$DATA/valid.txt"
        --tokenizer "$RUNS/gutenberg-tokenizer" --batch-size 16 --block-size 256 --eval-every 500 --eval-batches 16
        --save-every 1000 --keep-last 2 --log-every 50 --compile --seed 1337)
start=$(date +%s)
glade pretrain --config "$HERE/train_config.json" --output-dir "$RUNS/gutenberg-glade" --max-steps "$STEPS" \
  --warmup-steps 500 --optimizer muon --muon-lr 0.02 --lr 4e-3 --min-lr 4e-4 "${COMMON[@]}"
minutes=$(( ($(date +%s) - start) / 60 ))

# The baseline's speed on this machine: transformers' own GPT2LMHeadModel of the same shape with AdamW, compiled.
# The card turns it into the tokens that model would see in the run's wall-clock time.
python - "$RUNS/gpt2-baseline-init" <<'PY'
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
config = GPT2Config(n_layer=6, n_embd=256, n_head=4, n_positions=256, vocab_size=8192, bos_token_id=0,
                    eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
torch.manual_seed(1337)
GPT2LMHeadModel(config).save_pretrained(sys.argv[1])
PY
glade pretrain --init-from "$RUNS/gpt2-baseline-init" --output-dir "$RUNS/gutenberg-gpt2-speed" --max-steps 200 \
  --lr 2e-3 "${COMMON[@]}"

LM_EVAL=()
if command -v lm_eval >/dev/null; then
  lm_eval --model hf --model_args "pretrained=$RUNS/gutenberg-glade/final,trust_remote_code=True" \
    --include_path benchmarks/lm_eval --tasks gutenberg_heldout --batch_size 8 --output_path "$RUNS/lm-eval"
  LM_EVAL=(--lm-eval "$(ls -t "$RUNS"/lm-eval/*/results_*.json | head -1)")
fi

python "$HERE/make_card.py" --run "$RUNS/gutenberg-glade" --minutes "$minutes" \
  --baseline-speed "$RUNS/gutenberg-gpt2-speed" "${LM_EVAL[@]}"
