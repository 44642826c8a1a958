#!/usr/bin/env bash
# Rebuild glade-gutenberg-7m (and its GPT2LMHeadModel baseline) from the public-domain Gutenberg books.
# Run from the repository root with glade installed: bash model_cards/glade-gutenberg-7m/reproduce.sh
# DATA defaults to the project's shared corpus; on 2 CPU cores the two runs take about 70-80 minutes side by side.
set -euo pipefail
DATA=${DATA:-../shared/data/gutenberg-en}
RUNS=${RUNS:-runs}
HERE=model_cards/glade-gutenberg-7m

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
        --tokenizer "$RUNS/gutenberg-tokenizer" --max-steps 2000 --batch-size 16 --block-size 256 --lr 1e-3
        --min-lr 1e-4 --warmup-steps 150 --eval-every 250 --eval-batches 16 --save-every 500 --log-every 25 --seed 1337)
start=$(date +%s)
OMP_NUM_THREADS=1 glade pretrain --config "$HERE/train_config.json" --output-dir "$RUNS/gutenberg-glade" "${COMMON[@]}" &
glade_pid=$!
OMP_NUM_THREADS=1 glade pretrain --init-from "$RUNS/gpt2-baseline-init" --output-dir "$RUNS/gutenberg-gpt2-baseline" "${COMMON[@]}" &
baseline_pid=$!
wait $glade_pid; glade_minutes=$(( ($(date +%s) - start) / 60 ))
wait $baseline_pid; baseline_minutes=$(( ($(date +%s) - start) / 60 ))

python "$HERE/make_card.py" --run "$RUNS/gutenberg-glade" --baseline "$RUNS/gutenberg-gpt2-baseline" \
  --wall-minutes "$glade_minutes" --glade-minutes "$glade_minutes" --baseline-minutes "$baseline_minutes"
