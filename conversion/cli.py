"""`glade convert gpt2|nanogpt ...` (weights into Glade) and `glade export gpt2|stock|gguf|onnx ...` (Glade out: stock
GPT-2, the stock transformers class the config picks, llama.cpp's GGUF, ONNX)."""

import argparse

from .saving import Conversion
from .gpt2 import convert_gpt2, export_gpt2
from .nanogpt import convert_nanogpt
from .stock import export_stock

PARITY_FAILED_EXIT_CODE = 1


def add_convert_arguments(convert: argparse.ArgumentParser) -> None:
    """`glade convert FORMAT ...`."""
    sources = convert.add_subparsers(dest="format", required=True, metavar="FORMAT")

    gpt2 = sources.add_parser("gpt2", help="a Hugging Face GPT2LMHeadModel folder or hub id")
    gpt2.add_argument("source", help="checkpoint folder or hub id (e.g. openai-community/gpt2)")
    gpt2.add_argument("destination", help="output folder for the Glade checkpoint")
    _add_check_option(gpt2)
    _add_overwrite_option(gpt2)
    gpt2.set_defaults(func=_run_convert_gpt2)

    nanogpt = sources.add_parser("nanogpt", help="a nanoGPT ckpt.pt")
    nanogpt.add_argument("checkpoint", help="nanoGPT ckpt.pt (with 'model' and 'model_args')")
    nanogpt.add_argument("destination", help="output folder for the Glade checkpoint")
    nanogpt.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="tokenizer folder to ship with the model (e.g. GPT-2's)"
    )
    nanogpt.add_argument(
        "--crop-vocab", type=int, default=None, metavar="N", help="keep only the first N token embeddings (e.g. 50257)"
    )
    _add_overwrite_option(nanogpt)
    nanogpt.set_defaults(func=_run_convert_nanogpt)


def add_export_arguments(export: argparse.ArgumentParser) -> None:
    """`glade export FORMAT ...`."""
    targets = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    export_gpt2_parser = targets.add_parser("gpt2", help="a plain GPT2LMHeadModel folder (no custom code)")
    export_gpt2_parser.add_argument("source", help="Glade checkpoint folder or hub id")
    export_gpt2_parser.add_argument("destination", help="output folder for the GPT-2 checkpoint")
    _add_check_option(export_gpt2_parser)
    _add_overwrite_option(export_gpt2_parser)
    export_gpt2_parser.set_defaults(func=_run_export_gpt2)

    stock = targets.add_parser(
        "stock",
        help="the stock transformers class that computes the same model, picked from the config: "
        "GPT2LMHeadModel, GPTNeoXForCausalLM (rotary + LayerNorm), LlamaForCausalLM (rotary + RMSNorm + SwiGLU) "
        "or Qwen3ForCausalLM (+ QK-norm)",
    )
    stock.add_argument("source", help="Glade checkpoint folder or hub id")
    stock.add_argument("destination", help="output folder for the stock checkpoint")
    stock.add_argument(
        "--untie-head",
        action="store_true",
        help="write a tied output head as its own tensor (tie_word_embeddings: false; same logits), as llama.cpp's "
        "convert_hf_to_gguf.py needs for GPTNeoXForCausalLM (glade export gguf needs no such option)",
    )
    _add_check_option(stock)
    _add_overwrite_option(stock)
    stock.set_defaults(func=_run_export_stock)

    gguf = targets.add_parser("gguf", help="one GGUF file for llama.cpp (GPT-2, GPT-NeoX, Llama or Qwen3 shapes)")
    gguf.add_argument("source", help="Glade (or GPT-2) checkpoint folder or hub id")
    gguf.add_argument("destination", help="output .gguf file")
    gguf.add_argument(
        "--dtype", choices=("f32", "f16", "q8_0"), default="f32", help="type of the weight matrices (default: f32)"
    )
    gguf.add_argument("--overwrite", action="store_true", help="replace an existing destination file")
    gguf.set_defaults(func=_run_export_gguf)

    onnx = targets.add_parser("onnx", help="model.onnx (input_ids, attention_mask -> logits) with config and tokenizer")
    onnx.add_argument("source", help="Glade checkpoint folder or hub id")
    onnx.add_argument("destination", help="output folder")
    _add_overwrite_option(onnx)
    onnx.set_defaults(func=_run_export_onnx)


def _add_check_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare source and result, print and save a parity report "
        f"(exit code {PARITY_FAILED_EXIT_CODE} if it fails)",
    )


def _add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination folder")


def _report(conversion: Conversion) -> int:
    if conversion.parity is not None:
        print(conversion.parity.format())
    print(f"Wrote {conversion.destination}")
    return 0 if conversion.parity is None or conversion.parity.passed else PARITY_FAILED_EXIT_CODE


def _run_convert_gpt2(args: argparse.Namespace) -> int:
    return _report(convert_gpt2(args.source, args.destination, overwrite=args.overwrite, check=args.check))


def _run_convert_nanogpt(args: argparse.Namespace) -> int:
    return _report(
        convert_nanogpt(
            args.checkpoint,
            args.destination,
            tokenizer_dir=args.tokenizer,
            crop_vocab=args.crop_vocab,
            overwrite=args.overwrite,
        )
    )


def _run_export_gpt2(args: argparse.Namespace) -> int:
    return _report(export_gpt2(args.source, args.destination, overwrite=args.overwrite, check=args.check))


def _run_export_gguf(args: argparse.Namespace) -> int:
    from .gguf import export_gguf  # the gguf library loads only for this command

    print(f"Wrote {export_gguf(args.source, args.destination, dtype=args.dtype, overwrite=args.overwrite)}")
    return 0


def _run_export_stock(args: argparse.Namespace) -> int:
    return _report(
        export_stock(
            args.source, args.destination, overwrite=args.overwrite, check=args.check, untie_head=args.untie_head
        )
    )


def _run_export_onnx(args: argparse.Namespace) -> int:
    from .onnx import export_onnx  # torch.onnx's exporter loads only for this command

    print(f"Wrote {export_onnx(args.source, args.destination, overwrite=args.overwrite)}")
    return 0
