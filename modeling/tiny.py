"""A tiny random Glade model and a byte-level tokenizer without merges (`tiny-random`).

They need no files and no network, so tests, examples and `glade generate` (before a trained checkpoint is
available) can always run.
"""

from tokenizers import models
from transformers import PreTrainedTokenizerFast

from .byte_level import BYTE_ALPHABET, END_OF_TEXT, byte_level_bpe, wrap_tokenizer
from .configuration_glade import GladeConfig
from .modeling_glade import GladeForCausalLM


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's byte-level pre-tokenization with no merges: 256 byte tokens plus `<|endoftext|>` (id 256)."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(BYTE_ALPHABET))}
    vocab[END_OF_TEXT] = len(vocab)
    return wrap_tokenizer(byte_level_bpe(models.BPE(vocab=vocab, merges=[])))


def tiny_config(vocab_size: int = 257, **overrides) -> GladeConfig:
    """A 2-layer, 64-wide config whose special ids are the last id, as with `byte_level_tokenizer`."""
    fields = dict(
        vocab_size=vocab_size, n_positions=128, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    fields.update(overrides)
    config = GladeConfig(**fields)
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id
    return config


def tiny_model(seed: int = 0, **overrides) -> GladeForCausalLM:
    import torch

    torch.manual_seed(seed)
    return GladeForCausalLM(tiny_config(**overrides)).eval()
