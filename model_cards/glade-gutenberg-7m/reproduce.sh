#!/usr/bin/env bash
# Rebuild glade-gutenberg-7m and its GPT2LMHeadModel baseline from the public-domain Gutenberg books.
# Run from the repository root with glade installed: bash model_cards/glade-gutenberg-7m/reproduce.sh
# DATA defaults to the project's shared corpus. On 2 CPU cores the two runs share the machine, one core each, for
# about 100 minutes; the tokenizer takes one more.
set -euo pipefail
DATA=${DATA:-../shared/data/gutenberg-en}
RUNS=${RUNS:-runs}
HERE=model_cards/glade-gutenberg-7m
# Same wall-clock budget for both: the step counts follow the measured one-thread speeds of the compiled models
# (side by side, one core each: Glade 2.7k tokens/s, GPT2LMHeadModel 2.45k tokens/s at this 6-layer, 256-wide shape).
GLADE_STEPS=${GLADE_STEPS:-3600}
BASELINE_STEPS=${BASELINE_STEPS:-3200}

glade train-tokenizer --data "$DATA/children.txt" "$DATA/fiction.txt" --vocab-size 8192 --output-dir "$RUNS/gutenberg-tokenizer"

# The baseline: transformers' own GPT-2 class, same shape, randomly initialised with the same seed.
python - "$RUNS/gpt2-baseline-init" <<'PY'
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
config = GPT2Config(n_layer=6, n_embd=256, n_head=4, n_positions=256, vocab_size=8192, bos_token_id=0,
                    eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
torch.manual_seed(1337)
GPT2LMHeadModel(config).save_pretrained(sys.argv[1])
PY

COMMON=(--dropout 0 --data "$DATA/children.txt" "$DATA/fiction.txt" --val-data "$DATA/valid.txt"
        --tokenizer "$RUNS/gutenberg-tokenizer" --batch-size 16 --block-size 256 --lr 2e-3 --min-lr 1e-4
        --warmup-steps 200 --eval-every 300 --eval-batches 16 --save-every 600 --keep-last 2 --log-every 25
        --compile --seed 1337)
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
start=$(date +%s)
glade pretrain --config "$HERE/train_config.json" --output-dir "$RUNS/gutenberg-glade" --max-steps "$GLADE_STEPS" \
  "${COMMON[@]}" &
glade_pid=$!
glade pretrain --init-from "$RUNS/gpt2-baseline-init" --output-dir "$RUNS/gutenberg-gpt2-baseline" \
  --max-steps "$BASELINE_STEPS" "${COMMON[@]}" &
baseline_pid=$!
wait $glade_pid; glade_minutes=$(( ($(date +%s) - start) / 60 ))
wait $baseline_pid; baseline_minutes=$(( ($(date +%s) - start) / 60 ))

python "$HERE/make_card.py" --run "$RUNS/gutenberg-glade" --baseline "$RUNS/gutenberg-gpt2-baseline" \
  --glade-minutes "$glade_minutes" --baseline-minutes "$baseline_minutes"
