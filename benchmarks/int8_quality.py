"""What int8 decoding costs in quality: bits per byte on a text, fp32 against Glade's int8 step and llama.cpp's q8_0.

    python benchmarks/int8_quality.py                    # the shipped model on ../shared/data/gutenberg-en/valid.txt
    python benchmarks/int8_quality.py --model DIR --text FILE

The text is cut into blocks of the model's context (`n_positions` tokens); every token of a block but the first is
scored, and bits per byte divides the summed loss (in bits) by the text's UTF-8 bytes, the same tokens and bytes for
every row. Rows:
- `fp32`: the model as it is;
- `Glade int8`: `glade.native_decoding.int8_twin`, the fp32 model that computes what the int8 step computes (the
  tests hold the two equal to fp32 rounding);
- `llama.cpp f32` / `q8_0`: llama-cpp-python on `glade export gguf` files, where it is installed (f32 checks that
  both sides score the same tokens the same way).
"""

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from glade.loading import default_model, load_model_and_tokenizer
from glade.native_decoding import int8_twin

from timing import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "gutenberg-en" / "valid.txt"


def blocks_of(ids: list[int], length: int) -> torch.Tensor:
    usable = len(ids) // length * length
    return torch.tensor(ids[:usable]).view(-1, length)


@torch.no_grad()
def torch_bits(model, blocks: torch.Tensor, batch: int = 16) -> float:
    total = 0.0
    for start in range(0, len(blocks), batch):
        chunk = blocks[start : start + batch]
        logits = model(input_ids=chunk).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    return total / math.log(2)


def llama_cpp_bits(model, tokenizer, blocks: torch.Tensor, dtype: str) -> float | None:
    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        print(f"llama.cpp {dtype}: llama-cpp-python is not installed (pip install -e '.[llama]'); row skipped",
              file=sys.stderr)
        return None
    from glade.conversion.gguf import export_gguf

    folder = Path(tempfile.mkdtemp(prefix="glade-int8-quality-"))
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    export_gguf(folder / "model", folder / "model.gguf", dtype=dtype)
    length = blocks.shape[1]
    llama = Llama(str(folder / "model.gguf"), n_ctx=length, n_batch=length, logits_all=True, verbose=False)
    total = 0.0
    for block in blocks.tolist():
        llama.reset()
        llama.eval(block)
        logits = torch.from_numpy(np.asarray(llama.scores[: length - 1], dtype=np.float32))
        total += F.cross_entropy(logits, torch.tensor(block[1:]), reduction="sum").item()
    return total / math.log(2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a Glade checkpoint (default: the shipped model)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    args = parser.parse_args(argv)
    checkpoint = args.model or default_model()
    model, tokenizer = load_model_and_tokenizer(str(checkpoint))
    model.eval()
    text = args.text.read_text(encoding="utf-8")
    ids = tokenizer(text).input_ids
    blocks = blocks_of(ids, model.config.n_positions)
    text_bytes = len(text.encode("utf-8")) * blocks.numel() / len(ids)  # the bytes of the tokens the blocks hold
    rows = {
        "fp32": torch_bits(model, blocks),
        "Glade int8 (per-row scales)": torch_bits(int8_twin(model), blocks),
        "llama.cpp f32": llama_cpp_bits(model, tokenizer, blocks, "f32"),
        "llama.cpp q8_0": llama_cpp_bits(model, tokenizer, blocks, "q8_0"),
    }
    print(f"{checkpoint} on {args.text.name}: {len(blocks)} blocks of {blocks.shape[1]} tokens; flags: "
          f"{' '.join(cpu_flags())}")
    print(f"{'weights':<30} {'bits/byte':>10} {'vs fp32':>9}")
    report = {}
    for name, bits in rows.items():
        if bits is None:
            continue
        report[name] = bits / text_bytes
        print(f"{name:<30} {report[name]:>10.4f} {report[name] - report['fp32']:>+9.4f}")
    return report


if __name__ == "__main__":
    main()
