"""What logit soft-capping costs a training step: the fused loss with and without the cap, next to a whole step.

    python benchmarks/softcap.py                      # glade-tiny (the recipe ablation's shape) and the shipped shape
    python benchmarks/softcap.py --threads 1

Per shape: one eager fp32 training step (forward + backward, batch 16 x 256, vocabulary 8,192, the fused loss) and the
fused loss alone (`causal_lm_loss_from_hidden`, forward + backward) with no cap and with a cap of 15, timed interleaved
(`timing.alternate`), medians. The cap's cost is the loss's extra time over a step with the cap.
"""

import argparse

import torch

from glade import GladeConfig, GladeForCausalLM
from glade.kernels_glade import causal_lm_loss_from_hidden

from timing import alternate, cpu_flags

SHAPES = {"glade-tiny": (4, 128), "shipped (6 x 256)": (6, 256)}
BATCH, BLOCK, VOCAB, CAP = 16, 256, 8192, 15.0


def measure(n_layer: int, n_embd: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    config = GladeConfig(n_layer=n_layer, n_embd=n_embd, n_head=4, n_positions=BLOCK, vocab_size=VOCAB,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GladeForCausalLM(config)
    ids = torch.randint(0, VOCAB, (BATCH, BLOCK))
    hidden = torch.randn(BATCH * BLOCK, n_embd, requires_grad=True)
    head = (torch.randn(VOCAB, n_embd) * 0.02).requires_grad_()

    def loss(cap: float | None) -> None:
        causal_lm_loss_from_hidden(hidden, head, ids, logit_softcap=cap).backward()

    samples = alternate(
        {
            "step": lambda: model(input_ids=ids, labels=ids, skip_logits=True).loss.backward(),
            "loss": lambda: loss(None),
            "capped loss": lambda: loss(CAP),
        },
        warmup=1, repeats=repeats, label=f"{n_layer} x {n_embd}",
    )
    return {name: sample.median_wall_s * 1000 for name, sample in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; CPU flags: {' '.join(cpu_flags()) or 'none of note'}")
    for name, (n_layer, n_embd) in SHAPES.items():
        ms = measure(n_layer, n_embd, args.repeats)
        extra = ms["capped loss"] - ms["loss"]
        print(f"{name}: step {ms['step']:.0f} ms, fused loss {ms['loss']:.0f} ms, with cap {CAP:g} "
              f"{ms['capped loss']:.0f} ms: the cap costs {extra / (ms['step'] + extra):.1%} of a step")


if __name__ == "__main__":
    main()
