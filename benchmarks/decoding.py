"""Decoding where users decode, against the floor of streaming the weights, all at one thread count.

    python benchmarks/decoding.py                          # the shipped model, ~3 minutes (compilation included)
    python benchmarks/decoding.py --model DIR --threads 1  # any Glade checkpoint, another thread count
    python benchmarks/decoding.py --only "^pipeline" llama --rounds 3  # some routes, taking turns, three times

Each route continues the same prompt at batch 1. Per-token milliseconds are (time of a call making `--new-tokens` new
tokens - time of a call making `--short-tokens`) / their difference, each the median of `--repeats` calls after a
warm-up call of both lengths, so that prompt processing, compilation and per-call costs cancel out. With `--rounds`
the routes take turns that many times and each figure is the median of its rounds: on a machine whose speed drifts
(a shared host), routes compared in one round saw the same conditions. Routes:
- `pipeline` greedy and with the checkpoint's sampling settings: `pipeline("text-generation")` as it comes
  (`glade.fast_generate`'s "auto" route: the C step where it runs), with `fast_decoding="int8"` (the C step on int8
  weights), and with `fast_decoding="off"` (transformers' generate());
- `CompiledDecoder`: the compiled step called directly, greedy;
- `gpt2 static compiled`: transformers' GPT-2 of the same shape (learned positions where the checkpoint has rotary
  ones), `generate()` with a static cache and compilation forced on CPU, GPT-2's fastest transformers route;
- `llama.cpp f32` / `q8_0`: llama-cpp-python on the checkpoint's `glade export gguf` files, where it is installed;
- `floor`: the checkpoint's weight bytes over the rate a sum streams a buffer of the same size.
"""

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CompileConfig, GPT2Config, GPT2LMHeadModel, pipeline

from glade.loading import default_model, load_model_and_tokenizer
from glade.hardware import cpu_name

from timing import best_seconds, cpu_flags

PROMPT = "It was a dark and stormy night, and the rain fell in torrents"


def per_token_ms(run: Callable[[int], object], long: int, short: int, repeats: int) -> float:
    run(long)
    run(short)
    timings = {long: [], short: []}
    for _ in range(repeats):
        for tokens in (long, short):
            start = time.perf_counter()
            run(tokens)
            timings[tokens].append(time.perf_counter() - start)
    return 1e3 * (statistics.median(timings[long]) - statistics.median(timings[short])) / (long - short)


def floor_ms(model: torch.nn.Module, repeats: int) -> tuple[float, float]:
    """(milliseconds to stream the weights once, their megabytes): tied weights counted once."""
    unique = {parameter.data_ptr(): parameter for parameter in model.parameters()}.values()
    weight_bytes = sum(parameter.numel() * parameter.element_size() for parameter in unique)
    buffer = torch.ones(weight_bytes // 4, dtype=torch.float32)
    return 1e3 * best_seconds(buffer.sum, repeats), weight_bytes / 1e6


def gpt2_twin(config) -> GPT2LMHeadModel:
    twin = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, n_inner=config.n_inner, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(twin).eval()


def routes(checkpoint: str, threads: int) -> dict[str, Callable[[int], object]]:
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    model.eval()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    sampling = {key: value for key, value in model.generation_config.to_diff_dict().items()
                if key in ("do_sample", "temperature", "top_k", "top_p")}
    def pipe(**options) -> Callable[[int], object]:
        # The end id is held back until the last token (min_new_tokens), so every call makes the tokens asked for.
        return lambda tokens: generator(PROMPT, max_new_tokens=tokens, min_new_tokens=tokens, **options)

    from glade.decoding import CompiledDecoder

    decoder = CompiledDecoder(model)
    gpt2 = gpt2_twin(model.config)
    gpt2.generation_config.compile_config = CompileConfig(fullgraph=True)
    gpt2.generation_config.compile_config._compile_all_devices = True
    found = {
        "pipeline greedy": pipe(do_sample=False),
        "pipeline sampling": pipe(**sampling),
        "pipeline greedy, int8": pipe(do_sample=False, fast_decoding="int8"),
        "pipeline sampling, int8": pipe(fast_decoding="int8", **sampling),
        "pipeline greedy, transformers' generate()": pipe(do_sample=False, fast_decoding="off"),
        "pipeline sampling, transformers' generate()": pipe(fast_decoding="off", **sampling),
        "CompiledDecoder greedy": lambda tokens: decoder.generate(prompt, tokens),
        "gpt2 static compiled greedy": lambda tokens: gpt2.generate(
            prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, cache_implementation="static"
        ),
    }
    for dtype in ("f32", "q8_0"):
        llama = llama_cpp_route(model, tokenizer, threads, dtype)
        if llama is not None:
            found[f"llama.cpp {dtype} greedy"] = llama
    return found


def llama_cpp_route(model, tokenizer, threads: int, dtype: str) -> Callable[[int], object] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed (pip install -e '.[llama]'); row skipped", file=sys.stderr)
        return None
    from glade.conversion.gguf import export_gguf

    folder = Path(tempfile.mkdtemp(prefix="glade-decoding-"))
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    export_gguf(folder / "model", folder / "model.gguf", dtype=dtype)
    llama = Llama(str(folder / "model.gguf"), n_ctx=model.config.n_positions, n_threads=threads,
                  n_threads_batch=threads, verbose=False)
    prompt = tokenizer(PROMPT).input_ids

    def run(tokens: int) -> None:
        llama.reset()
        for made, _ in enumerate(llama.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True), 1):
            if made == tokens:
                break

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a Glade checkpoint (default: the shipped model)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--short-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="measure every route this many times, in turns")
    parser.add_argument("--only", nargs="+", default=None,
                        help="the routes whose names match one of these regular expressions")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if not 0 < args.short_tokens < args.new_tokens:
        parser.error(f"--short-tokens must be in [1, --new-tokens), got {args.short_tokens}")
    torch.set_num_threads(args.threads)
    checkpoint = args.model or default_model()
    model, _ = load_model_and_tokenizer(checkpoint)
    chosen = {name: run for name, run in routes(str(checkpoint), args.threads).items()
              if args.only is None or any(re.search(pattern, name) for pattern in args.only)}
    timings: dict[str, list[float]] = {"floor": [], **{name: [] for name in chosen}}
    for _ in range(args.rounds):
        floor, megabytes = floor_ms(model, args.repeats * 4)
        timings["floor"].append(floor)
        for name, run in chosen.items():
            timings[name].append(per_token_ms(run, args.new_tokens, args.short_tokens, args.repeats))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    floor = medians.pop("floor")
    report = {"checkpoint": str(checkpoint), "cpu": cpu_name(), "cpu_flags": cpu_flags(), "threads": args.threads,
              "torch": torch.__version__, "weights_mb": megabytes, "floor_ms": floor, "rounds": timings,
              "routes": medians}
    print(f"{checkpoint}: {megabytes:.1f} MB of weights; {cpu_name()}, {args.threads} thread(s); "
          f"flags: {' '.join(report['cpu_flags'])}; median of {args.rounds} round(s)")
    print(f"{'route':<45} {'ms/token':>9} {'tokens/s':>9} {'x floor':>8}")
    print(f"{'floor (streaming the weights once)':<45} {floor:>9.3f} {1e3 / floor:>9.0f} {1.0:>8.2f}")
    for name, ms in medians.items():
        print(f"{name:<45} {ms:>9.3f} {1e3 / ms:>9.0f} {ms / floor:>8.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
