"""A saved tiny Glade checkpoint whose every tensor matters, for the export tests."""

from pathlib import Path

import torch

from glade import GladeForCausalLM
from glade.tiny import byte_level_tokenizer, tiny_model


def saved_random_glade(directory: Path, **options) -> GladeForCausalLM:
    """A tiny Glade model with every tensor randomised (init leaves norms at 1 and biases at 0, which would hide a
    mixed-up or dropped one), saved to `directory` with a byte-level tokenizer."""
    model = tiny_model(**options)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return model


LLAMA_CPP_PROMPTS = ["It was a dark and stormy night", '"Who is there?" cried Mr. Lorry,', "  The   sea;\nand then 1984"]


def assert_llama_cpp_continues_like_transformers(llama, folder: Path) -> None:
    """A llama-cpp-python model tokenizes each prompt as the folder's tokenizer does, and continues it with the 20
    tokens transformers' greedy generate() gives with the folder's model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    for prompt in LLAMA_CPP_PROMPTS:
        ids = tokenizer(prompt).input_ids
        # add_bos=True adds the special tokens the file asks for: none, as Glade's tokenizer adds none
        assert llama.tokenize(prompt.encode(), add_bos=True, special=False) == ids
        expected = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
        generated = []
        for token in llama.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            generated.append(token)
            if len(generated) == len(expected):
                break
        assert generated == expected, prompt
