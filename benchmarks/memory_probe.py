"""Peak training memory of one contestant, measured alone in this fresh process (run by run.py, one per measurement).

Method: build the model, its optimizer and a batch, then reset the kernel's resident-set high-water mark (VmHWM,
reset by writing 5 to /proc/self/clear_refs) and take the resident set as the baseline. After two training steps (fp32,
or under bf16 autocast; the first allocates AdamW's state), the high-water mark minus the baseline is everything
training adds on top of the weights: gradients, optimizer state, activations, autocast copies, temporaries. run.py starts this
process with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the kernel at once
and the figure follows live memory rather than the allocator's history. torch's CPU allocator does no caching.

Prints one JSON object.
"""

import argparse
import gc
import json

import torch

from models import QUICK_SHAPES, SHAPES, build_model, make_batch, make_optimizer, training_step

KIB = 1024


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field} line")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True, choices=["gpt2", "glade", "nanogpt"])
    parser.add_argument("--shape", required=True, choices=list(SHAPES))
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: under bf16 autocast")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    shape = (QUICK_SHAPES if args.quick else SHAPES)[args.shape]
    model = build_model(shape, args.variant)  # the weights' values do not change what training allocates
    optimizer = make_optimizer(model)
    batch = make_batch(shape)
    gc.collect()
    reset_peak()
    baseline = status_kib("VmRSS")
    for _ in range(2):
        training_step(model, optimizer, batch, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    peak = status_kib("VmHWM")
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        json.dumps(
            {
                "peak_mib": (peak - baseline) / KIB,
                "baseline_mib": baseline / KIB,
                "parameters_mib": parameters / KIB**2,
            }
        )
    )


if __name__ == "__main__":
    main()
