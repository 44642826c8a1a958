"""Byte-level BPE tokenizers for Glade (`glade.byte_level`): trained with `tokenizers`, saved as a
`PreTrainedTokenizerFast` directory."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import decoders, models, trainers
from transformers import PreTrainedTokenizerFast

from glade.atomic import atomic_directory
from glade.byte_level import BYTE_ALPHABET, END_OF_TEXT, byte_level_bpe, wrap_tokenizer
from glade.loading import load_tokenizer_files

from .data import iter_texts, load_documents, naming_undecodable_files, resolve_text_source

# Every byte needs a token before any merge can be learned, plus one for <|endoftext|>.
MIN_VOCAB_SIZE = len(BYTE_ALPHABET) + 1


def check_min_frequency(min_frequency: int) -> None:
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1 (a merge seen once), got {min_frequency}")


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = True
) -> PreTrainedTokenizerFast:
    """Learn byte-level BPE merges from `texts` until the vocabulary has `vocab_size` tokens (or merges run out)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {END_OF_TEXT}), got {vocab_size}"
        )
    check_min_frequency(min_frequency)
    backend = byte_level_bpe(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=BYTE_ALPHABET,
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer)
    return wrap_tokenizer(backend)


# What a saved tokenizer folder may hold: a folder of these files alone is replaced without --overwrite.
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja",
})


def check_output_dir(output_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an output folder that holds anything but a tokenizer: it would be replaced whole."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--output-dir {path} is a file, not a folder")
    if overwrite or not path.is_dir():
        return
    others = sorted(entry.name for entry in path.iterdir() if entry.name not in TOKENIZER_FILES)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise FileExistsError(
            f"--output-dir {path} holds files that are not a tokenizer's ({shown}); the tokenizer replaces the whole "
            "folder, so choose an empty or new folder, or pass --overwrite to replace it"
        )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Save to `output_dir` through a staging directory, so a crash never leaves half a tokenizer. The folder is
    replaced whole: one holding anything but a tokenizer is refused unless `overwrite`."""
    check_output_dir(output_dir, overwrite)
    with atomic_directory(output_dir) as staging:
        tokenizer.save_pretrained(staging)
    return Path(output_dir)


def train_tokenizer_from_data(
    data: Sequence[str],
    vocab_size: int,
    output_dir: str | Path,
    text_column: str = "text",
    split: str = "train",
    streaming: bool = False,
    min_frequency: int = 2,
    overwrite: bool = False,
) -> PreTrainedTokenizerFast:
    """Train on text files or a dataset (anything `glade.training.data.resolve_text_source` accepts) and save."""
    check_min_frequency(min_frequency)
    check_output_dir(output_dir, overwrite)
    source = resolve_text_source(data, text_column=text_column, split=split)
    # Streamed documents are read while training, so a file that is not UTF-8 can fail in either step.
    with naming_undecodable_files(source):
        documents = load_documents(source, streaming=streaming)
        tokenizer = train_tokenizer(iter_texts(documents, text_column), vocab_size, min_frequency=min_frequency)
    if len(tokenizer) <= MIN_VOCAB_SIZE:
        raise ValueError(f"no merges could be learned from {source.describe()}: is the text column empty?")
    save_tokenizer(tokenizer, output_dir, overwrite)
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer with an end-of-text token, as training needs (eos separates documents)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist (train one with `glade train-tokenizer`)")
    tokenizer = load_tokenizer_files(path)
    # transformers records where this machine loaded the files from and would save it with the tokenizer: a model
    # published from this run must not carry a path flag of the training machine.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    if not tokenizer.is_fast:
        raise ValueError(f"tokenizer at {path} is not a fast (Rust `tokenizers`) tokenizer")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no eos token; pretraining separates documents with it")
    return tokenizer


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """Bytes of text each token id stands for (0 for special tokens), to turn nats per token into bits per byte."""
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    byte_level = isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        if byte_level:
            # Each character of a byte-level token is one byte; decoding a lone token could split a UTF-8 char.
            lengths[token_id] = len(token)
        else:
            lengths[token_id] = len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`glade train-tokenizer`."""
    parser.add_argument("--data", nargs="+", required=True,
                        help=".txt/.jsonl/.parquet files (globs ok), a dataset folder, or a Hub dataset id")
    parser.add_argument("--vocab-size", type=int, required=True, help=f"tokens in the vocabulary (>= {MIN_VOCAB_SIZE})")
    parser.add_argument("--output-dir", required=True,
                        help="where to save the tokenizer; the folder is replaced whole, so one holding other files "
                             "is refused without --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output-dir that holds other files")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--data-split", default="train", help="split of a Hub dataset")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of loading it")
    parser.add_argument("--min-frequency", type=int, default=2, help="ignore merges seen fewer times")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    tokenizer = train_tokenizer_from_data(
        args.data, args.vocab_size, args.output_dir, text_column=args.text_column, split=args.data_split,
        streaming=args.streaming, min_frequency=args.min_frequency, overwrite=args.overwrite,
    )
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.output_dir}")
