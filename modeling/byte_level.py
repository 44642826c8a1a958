"""GPT-2's byte-level BPE building blocks: text is first mapped to bytes, so every string is encodable (no unknown
tokens), and the single special token `<|endoftext|>` separates documents and serves as bos, eos and pad.

The core needs them for `tiny-random`; `glade.training.tokenizer` trains tokenizers with them.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()


def byte_level_bpe(bpe: models.BPE) -> Tokenizer:
    """A tokenizer around `bpe` with GPT-2's byte-level pre-tokenization and decoding."""
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer in which `<|endoftext|>` is bos, eos, pad and unk, as in GPT-2."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
    )
