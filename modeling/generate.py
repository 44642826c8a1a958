"""`glade generate`: sample text from a Glade checkpoint through `pipeline("text-generation")`."""

import argparse

import torch
from transformers import Pipeline, pipeline

from .checkpoints import add_model_argument, default_model, load_model_and_tokenizer

DEFAULT_MAX_NEW_TOKENS = 50


def load_generator(model: str, device: str | None = None) -> Pipeline:
    """A text-generation pipeline for a checkpoint directory, a hub id, or `tiny-random`."""
    lm, tokenizer = load_model_and_tokenizer(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return pipeline("text-generation", model=lm, tokenizer=tokenizer, device=device)


def generate(
    prompts: list[str],
    model: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    device: str | None = None,
) -> list[str]:
    """Continue each prompt; returns prompt + continuation for each.

    Sampling settings left as None come from the checkpoint's generation config (a shipped model's card states
    them), and `max_new_tokens` falls back to 50 where the checkpoint sets no length.
    """
    if not prompts or any(not p for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy decoding for temperature 0), got {temperature}")
    generator = load_generator(model or default_model(), device=device)
    if seed is not None:
        torch.manual_seed(seed)
    if max_new_tokens is None:
        max_new_tokens = generator.model.generation_config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    options = {"max_new_tokens": max_new_tokens, "do_sample": not greedy}
    if not greedy:
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        options.update({name: value for name, value in sampling.items() if value is not None})
    results = generator(prompts, batch_size=len(prompts), **options)
    return [result[0]["generated_text"] for result in results]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`glade generate`."""
    parser.add_argument("prompt", nargs="+", help="one or more prompts (batched together)")
    add_model_argument(parser)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default: the model's generation config, else {DEFAULT_MAX_NEW_TOKENS}")
    parser.add_argument("--temperature", type=float, default=None, help="default: the model's generation config")
    parser.add_argument("--top-k", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--top-p", type=float, default=None, help="default: the model's generation config")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    texts = generate(
        args.prompt, model=args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed, device=args.device,
    )
    print("\n\n".join(texts))
