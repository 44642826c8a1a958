"""`glade` subcommands for training: `train-tokenizer` and `pretrain`."""

from __future__ import annotations

import argparse

from . import pretrain as pretrain_module
from .tokenizer import MIN_VOCAB_SIZE, train_tokenizer_from_data


def register(subparsers: argparse._SubParsersAction) -> None:
    tokenizer = subparsers.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on text")
    tokenizer.add_argument("--data", nargs="+", required=True,
                           help=".txt/.jsonl/.parquet files (globs ok), a dataset folder, or a Hub dataset id")
    tokenizer.add_argument("--vocab-size", type=int, required=True,
                           help=f"tokens in the vocabulary (>= {MIN_VOCAB_SIZE})")
    tokenizer.add_argument("--output-dir", required=True, help="where to save the tokenizer")
    tokenizer.add_argument("--text-column", default="text")
    tokenizer.add_argument("--data-split", default="train", help="split of a Hub dataset")
    tokenizer.add_argument("--streaming", action="store_true", help="stream the dataset instead of loading it")
    tokenizer.add_argument("--min-frequency", type=int, default=2, help="ignore merges seen fewer times")
    tokenizer.set_defaults(func=_train_tokenizer)

    pretrain = subparsers.add_parser(
        "pretrain",
        help="pre-train a Glade model (also under `accelerate launch`)",
        description=pretrain_module.__doc__.split("\n\n")[0],
    )
    pretrain_module.add_arguments(pretrain)
    pretrain.set_defaults(func=pretrain_module.run)


def _train_tokenizer(args: argparse.Namespace) -> None:
    tokenizer = train_tokenizer_from_data(
        args.data, args.vocab_size, args.output_dir, text_column=args.text_column, split=args.data_split,
        streaming=args.streaming, min_frequency=args.min_frequency,
    )
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.output_dir}")
