"""Byte-level BPE tokenizers for Glade: trained with `tokenizers`, saved as a `PreTrainedTokenizerFast` directory.

As in GPT-2, text is first mapped to bytes, so every string is encodable (no unknown tokens), and the single
special token `<|endoftext|>` separates documents and serves as bos, eos and pad.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from glade.atomic import atomic_directory
from glade.tiny import END_OF_TEXT, byte_level_bpe, wrap_tokenizer

BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()
# Every byte needs a token before any merge can be learned, plus one for <|endoftext|>.
MIN_VOCAB_SIZE = len(BYTE_ALPHABET) + 1


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = True
) -> PreTrainedTokenizerFast:
    """Learn byte-level BPE merges from `texts` until the vocabulary has `vocab_size` tokens (or merges run out)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {END_OF_TEXT}), got {vocab_size}"
        )
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


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, output_dir: str | Path) -> Path:
    """Save to `output_dir` (replacing it) through a staging directory, so a crash never leaves half a tokenizer."""
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
) -> PreTrainedTokenizerFast:
    """Train on text files or a dataset (anything `glade.training.data.resolve_source` accepts) and save."""
    from .data import iter_texts, load_documents, resolve_source

    source = resolve_source(data, text_column=text_column, split=split)
    documents = load_documents(source, streaming=streaming)
    tokenizer = train_tokenizer(iter_texts(documents, text_column), vocab_size, min_frequency=min_frequency)
    if len(tokenizer) <= MIN_VOCAB_SIZE:
        raise ValueError(f"no merges could be learned from {source.describe()}: is the text column empty?")
    save_tokenizer(tokenizer, output_dir)
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer with an end-of-text token, as training needs (eos separates documents)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist (train one with `glade train-tokenizer`)")
    tokenizer = AutoTokenizer.from_pretrained(path)
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
