"""`glade generate`: sample text from a Glade checkpoint through `pipeline("text-generation")`."""

import argparse
import logging
import math
import sys
import time

import torch
from transformers import Pipeline, PreTrainedModel, pipeline
from transformers.generation.streamers import BaseStreamer

from .loading import add_model_argument, default_model, load_model_and_tokenizer
from .hardware import bf16_support, computable_dtype
from .native_decoding import unavailable

logger = logging.getLogger(__name__)

# Length and repetition penalty are this command's own defaults, never read from a checkpoint: a generation_config.json
# that set them would also change what every other caller gets (a max_length overridden, greedy no longer greedy).
DEFAULT_MAX_NEW_TOKENS = 100
DEFAULT_REPETITION_PENALTY = 1.15


def load_generator(model: str, device: str | None = None) -> Pipeline:
    """A text-generation pipeline for a checkpoint directory, a hub id, or `tiny-random`."""
    lm, tokenizer = load_model_and_tokenizer(model)
    target = torch.device(device or "cpu")
    if (dtype := computable_dtype(lm.dtype, target)) != lm.dtype:
        logger.warning("%s holds %s weights, but %s: running in %s", model, lm.dtype, bf16_support(target), dtype)
        lm = lm.to(dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return pipeline("text-generation", model=lm, tokenizer=tokenizer, device=device)


# Scores divided by less overflow float32 (logits of ~40 / 1e-37), and the softmax of infinities is NaN.
MIN_TEMPERATURE = 1e-4


def check_temperature(temperature: float) -> None:
    if not MIN_TEMPERATURE <= temperature < math.inf:  # NaN fails this comparison too
        raise ValueError(
            f"temperature must be at least {MIN_TEMPERATURE} and finite (greedy decoding is the limit of 0: use "
            f"--greedy), got {temperature}"
        )


def check_prompts(prompts: list[str]) -> None:
    """Refuse an empty prompt list, an empty prompt, and text that is not valid Unicode (bytes a terminal could not
    decode reach Python's argv as lone surrogates, which no tokenizer encodes)."""
    if not prompts or any(not prompt for prompt in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    for number, prompt in enumerate(prompts, start=1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"prompt {number} is not valid UTF-8 text (undecodable bytes at characters {error.start}-{error.end})"
            ) from None


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, before the model is loaded."""
    if device is None:
        return
    try:
        target = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps, ...): {error}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__})")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine")


def check_sampling(temperature: float | None, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that cannot work, before a model is loaded; None means the checkpoint's value."""
    if temperature is not None:
        check_temperature(temperature)
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns top-k filtering off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 turns nucleus filtering off), got {top_p}")


def fit_in_context(prompt_length: int, max_new_tokens: int, context: int) -> int:
    """How many new tokens to generate after a prompt of `prompt_length` tokens: `max_new_tokens`, or, with a warning,
    as many as the model's context of `context` positions still holds (generate() would fail at its end, after doing
    the work). A prompt that leaves no room is a ValueError naming both lengths."""
    if prompt_length >= context:
        raise ValueError(
            f"the prompt is {prompt_length} tokens long and the model's context holds {context} (n_positions, "
            "times any RoPE scaling factor), "
            "so no token fits after it: shorten the prompt"
        )
    room = context - prompt_length
    if max_new_tokens <= room:
        return max_new_tokens
    logger.warning(
        "generating at most %d new tokens instead of %d: with the %d-token prompt they fill the model's context of %d "
        "tokens (n_positions, times any RoPE scaling factor)", room, max_new_tokens, prompt_length, context,
    )
    return room


class LatencyTimer(BaseStreamer):
    """Times a generate() call as a streamer sees it: from its creation to the first new token, and to the end."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.puts = 0
        self.first_token_s = self.total_s = math.nan

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1  # the first put is the prompt
        if self.puts == 2:
            self.first_token_s = time.perf_counter() - self.start

    def end(self) -> None:
        self.total_s = time.perf_counter() - self.start

    def report(self) -> str:
        new_tokens = self.puts - 1
        rate = (new_tokens - 1) / (self.total_s - self.first_token_s) if new_tokens > 1 else math.nan
        return f"first token after {self.first_token_s * 1000:.0f} ms; {new_tokens} steps, then {rate:.0f} steps/s"


def generate(
    prompts: list[str],
    model: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    device: str | None = None,
    compile: bool = False,
    quantize: str | None = None,
    timer: LatencyTimer | None = None,
) -> list[str]:
    """Continue each prompt; returns prompt + continuation for each.

    Decoding takes Glade's fast route (`glade.fast_generate`) on its C step where that runs (fp32 on CPU; with
    `quantize="int8"`, int8 copies of the projections), eagerly elsewhere, or compiled with `compile` (seconds of
    compilation the first time, repaid only by long or repeated requests). A `timer` gets the call's latencies.

    `max_new_tokens` defaults to 100 and `repetition_penalty` to 1.15 when sampling (1.0, off, with `greedy`),
    whatever the checkpoint's generation config says; sampling settings left as None come from it (a shipped model's
    card states them). Generation stops where the model's context ends, with a warning.
    """
    check_prompts(prompts)
    check_device(device)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if repetition_penalty is not None and not 0 < repetition_penalty < math.inf:
        raise ValueError(f"repetition_penalty must be > 0 and finite (1.0 turns it off), got {repetition_penalty}")
    if not greedy:
        check_sampling(temperature, top_k, top_p)
    if repetition_penalty is None:
        repetition_penalty = 1.0 if greedy else DEFAULT_REPETITION_PENALTY
    generator = load_generator(model or default_model(), device=device)
    if seed is not None:
        torch.manual_seed(seed)
    # A batch is padded to its longest prompt, and every row generates as many tokens.
    longest = max(len(generator.tokenizer(prompt, add_special_tokens=False).input_ids) for prompt in prompts)
    options = {
        "max_new_tokens": fit_in_context(
            longest, max_new_tokens or DEFAULT_MAX_NEW_TOKENS, generator.model.config.context_length
        ),
        "do_sample": not greedy,
        "repetition_penalty": repetition_penalty,
        "fast_decoding": decoding_route(generator.model, compile, quantize),
        "streamer": timer,
    }
    if not greedy:
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        options.update({name: value for name, value in sampling.items() if value is not None})
    results = generator(prompts, batch_size=len(prompts), **options)
    return [result[0]["generated_text"] for result in results]


def decoding_route(model: PreTrainedModel, compile: bool, quantize: str | None) -> str:
    """The fast route's step for a command-line request: asked for, or the C step where it runs, else eager (a
    one-off request does not repay compiling)."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be int8 or None, got {quantize!r}")
    if compile and quantize:
        raise ValueError(
            "--compile and --quantize do not combine: int8 weights run on the C step, which compiles nothing"
        )
    if compile:
        return "compiled"
    if quantize:
        return "int8"
    return "native" if unavailable(model) is None else "eager"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`glade generate`."""
    parser.add_argument("prompt", nargs="+", help="one or more prompts (batched together)")
    add_model_argument(parser)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default: {DEFAULT_MAX_NEW_TOKENS}, or fewer where the model's context ends")
    parser.add_argument("--temperature", type=float, default=None, help="default: the model's generation config")
    parser.add_argument("--top-k", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--top-p", type=float, default=None, help="default: the model's generation config")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help=f"default: {DEFAULT_REPETITION_PENALTY} when sampling, 1.0 (off) with --greedy")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decoding step: seconds of compilation (cached on disk for later runs), "
                             "then several times faster per token; pays off for long outputs (without it, an fp32 "
                             "model on CPU decodes on Glade's C step, compiled once per machine in about a second)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="decode with int8 copies of the projections (one scale per output row) on the C step: "
                             "a quarter of the bytes per token, at a small cost in quality")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    timer = LatencyTimer()
    texts = generate(
        args.prompt, model=args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, greedy=args.greedy,
        seed=args.seed, device=args.device, compile=args.compile, quantize=args.quantize, timer=timer,
    )
    print("\n\n".join(texts))
    print(timer.report(), file=sys.stderr)
