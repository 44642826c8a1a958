"""Small self-contained building blocks: a byte-level tokenizer and a tiny random Glade model.

They need no files and no network, so tests, examples and `glade generate` (before a trained checkpoint is
available) can always run.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .configuration_glade import GladeConfig
from .modeling_glade import GladeForCausalLM

END_OF_TEXT = "<|endoftext|>"


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


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's byte-level pre-tokenization with no merges: 256 byte tokens plus `<|endoftext|>` (id 256)."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
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
