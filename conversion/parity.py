"""Parity report: run a source and a converted causal LM on the same batch and say where, if anywhere, they part.

Both models must take `input_ids`, return `logits` and `hidden_states` (n_layer + 1 of them, the last after the
final LayerNorm, as GPT-2 and Glade do), and support `generate()`.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

REPORT_FILE = "parity_report.json"
SAMPLE_TEXT = (
    "The river ran high that spring, and the ferryman said he had never seen the water so brown. "
    "In the village, people talked of little else.\n\n"
    "By June the fields had dried, and the children went back to swimming off the old stone pier."
)
# generate() fills each setting a call leaves unset from the model's generation config, and then warns ("generation
# flags are not valid") that greedy decoding ignores a checkpoint's temperature or top_k. Greedy decoding reads none of
# them: set to the values transformers falls back to, there is nothing left to fill in or warn about.
GREEDY_SAMPLING_SETTINGS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclass
class ParityReport:
    source: str
    converted: str
    atol: float
    rtol: float
    num_tokens: int
    # Per hidden state ("embeddings", "block 0", ...), in model order.
    hidden_states_max_abs_diff: dict[str, float]
    first_drifting_block: str | None
    logits_max_abs_diff: float
    logits_within_tolerance: bool
    kl_divergence: float
    top1_agreement: float
    greedy_source: list[int]
    greedy_converted: list[int]

    @property
    def greedy_identical(self) -> bool:
        return self.greedy_source == self.greedy_converted

    @property
    def passed(self) -> bool:
        return self.first_drifting_block is None and self.logits_within_tolerance and self.greedy_identical

    def to_dict(self) -> dict:
        return {**asdict(self), "greedy_identical": self.greedy_identical, "passed": self.passed}

    def format(self) -> str:
        """The report as plain text for the terminal."""
        width = max(len(label) for label in self.hidden_states_max_abs_diff)
        lines = [
            f"Parity: {self.source} -> {self.converted} "
            f"({self.num_tokens} tokens, atol={self.atol:g}, rtol={self.rtol:g})",
            "hidden states, max |diff|:",
            *(f"  {label:<{width}}  {diff:.3e}" for label, diff in self.hidden_states_max_abs_diff.items()),
            f"first block that drifts: {self.first_drifting_block or 'none'}",
            f"logits max |diff|: {self.logits_max_abs_diff:.3e}",
            f"KL(source || converted) per token: {self.kl_divergence:.3e}",
            f"top-1 agreement: {self.top1_agreement:.2%}",
            f"greedy continuation ({len(self.greedy_source)} tokens): "
            + ("identical" if self.greedy_identical else "DIFFERS"),
            "PASS" if self.passed else "FAIL",
        ]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A model-card section."""
        rows = "\n".join(f"| {label} | {diff:.3e} |" for label, diff in self.hidden_states_max_abs_diff.items())
        return (
            "## Conversion parity\n\n"
            f"`{self.source}` and this conversion (`{self.converted}`) were run on the same {self.num_tokens} tokens "
            f"(tolerance: atol={self.atol:g}, rtol={self.rtol:g}).\n\n"
            f"| hidden state | max abs diff |\n|---|---|\n{rows}\n\n"
            f"- first block that drifts: {self.first_drifting_block or 'none'}\n"
            f"- logits max abs diff: {self.logits_max_abs_diff:.3e}\n"
            f"- KL divergence (source || converted), per token: {self.kl_divergence:.3e}\n"
            f"- top-1 agreement: {self.top1_agreement:.2%}\n"
            f"- greedy continuation ({len(self.greedy_source)} tokens) identical: "
            f"{'yes' if self.greedy_identical else 'no'}\n"
            f"- result: {'PASS' if self.passed else 'FAIL'}\n"
        )


def parity_batch(
    vocab_size: int, n_positions: int, tokenizer: PreTrainedTokenizerBase | None = None, length: int = 32
) -> torch.Tensor:
    """A fixed batch: the sample text when a tokenizer is at hand (real activations), else seeded random ids."""
    length = min(length, n_positions)
    if tokenizer is not None:
        ids = tokenizer(SAMPLE_TEXT)["input_ids"][:length]
        if max(ids) < vocab_size:
            return torch.tensor([ids])
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, length), generator=generator)


def _exceeds(diff: float, reference: torch.Tensor, atol: float, rtol: float) -> bool:
    # NaN compares False with any tolerance and an infinite reference makes the tolerance infinite: both must fail.
    return not math.isfinite(diff) or diff > atol + rtol * reference.abs().max().item()


def _hidden_state_labels(count: int) -> list[str]:
    # output_hidden_states gives the embeddings, each block's output, and replaces the last block's with ln_f's.
    return ["embeddings", *(f"block {i}" for i in range(count - 2)), f"block {count - 2} + ln_f"]


@torch.no_grad()
def greedy_continuation(model: PreTrainedModel, prompt: torch.Tensor, max_new_tokens: int) -> list[int]:
    # min_new_tokens keeps an end-of-text token from cutting one model's continuation short.
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **GREEDY_SAMPLING_SETTINGS
    )
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return output[0, prompt.shape[1] :].tolist()


@torch.no_grad()
def compare_models(
    source: PreTrainedModel,
    converted: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    source_name: str = "source",
    converted_name: str = "converted",
    greedy_tokens: int = 16,
    prompt_length: int = 8,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> ParityReport:
    """Compare two causal LMs on `input_ids` ([batch, seq]): hidden states, logits and a greedy continuation.

    A hidden state drifts when its max abs diff exceeds `atol + rtol * max|source state|`; the relative part
    matters for real checkpoints, whose residual streams carry activations in the thousands.
    """
    source.eval()
    converted.eval()
    expected = source(input_ids, output_hidden_states=True)
    actual = converted(input_ids, output_hidden_states=True)
    if len(expected.hidden_states) != len(actual.hidden_states):
        raise ValueError(
            f"The models differ in depth: {len(expected.hidden_states)} vs {len(actual.hidden_states)} hidden states"
        )

    hidden_diffs, first_drift = {}, None
    labels = _hidden_state_labels(len(expected.hidden_states))
    for label, ref, out in zip(labels, expected.hidden_states, actual.hidden_states):
        diff = (ref.double() - out.double()).abs().max().item()
        hidden_diffs[label] = diff
        if first_drift is None and _exceeds(diff, ref, atol, rtol):
            first_drift = label

    ref_logits, out_logits = expected.logits.double(), actual.logits.double()
    logits_diff = (ref_logits - out_logits).abs().max().item()
    ref_logprobs = F.log_softmax(ref_logits, dim=-1).flatten(0, 1)
    out_logprobs = F.log_softmax(out_logits, dim=-1).flatten(0, 1)
    kl = F.kl_div(out_logprobs, ref_logprobs, log_target=True, reduction="batchmean").item()
    top1 = (ref_logits.argmax(-1) == out_logits.argmax(-1)).double().mean().item()

    max_length = source.config.max_position_embeddings
    prompt = input_ids[:1, : min(prompt_length, input_ids.shape[1], max_length - 1)]
    greedy_tokens = min(greedy_tokens, max_length - prompt.shape[1])
    return ParityReport(
        source=source_name,
        converted=converted_name,
        atol=atol,
        rtol=rtol,
        num_tokens=input_ids.numel(),
        hidden_states_max_abs_diff=hidden_diffs,
        first_drifting_block=first_drift,
        logits_max_abs_diff=logits_diff,
        logits_within_tolerance=not _exceeds(logits_diff, ref_logits, atol, rtol),
        kl_divergence=kl,
        top1_agreement=top1,
        greedy_source=greedy_continuation(source, prompt, greedy_tokens),
        greedy_converted=greedy_continuation(converted, prompt, greedy_tokens),
    )


def write_parity_report(report: ParityReport, directory: Path) -> None:
    """Write `parity_report.json` into `directory`. The model card shows the report as a section (`to_markdown`):
    `glade.training.model_card.write_model_card(directory, parity_report=report)`."""
    (Path(directory) / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
