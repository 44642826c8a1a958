"""The choice of the next token, as transformers' logits processors make it, in a form one compiled graph can hold.

`generate()` builds a list of processors from the generation config and applies them in order: repetition penalty,
minimum length, then (sampling only) temperature, top-k and top-p; then softmax and `torch.multinomial`, or argmax.
`Sampling` holds the same settings as tensors, so a compiled decoding step serves new values without recompiling (top-k
keeps the best `top_k_bound` scores, the power of two above k, then cuts at the k-th: one graph per power), and
`process_scores` repeats the processors' arithmetic op for op, so that a seed draws the same tokens as `generate()`.
`Sampling.from_processors` reads the settings off the list transformers built, and refuses any processor it does not
reproduce.
"""

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

FILTERED = -float("inf")


@dataclass
class Sampling:
    """Per-request settings of the token choice. Values are 0-d tensors on the decoding device; a feature that is off
    is None (top-k, top-p) or its neutral value (a penalty or temperature of 1, no minimum)."""

    do_sample: bool
    end_mask: torch.Tensor  # [vocab] bool: the end ids, masked until `min_new_tokens` tokens are out
    min_new_tokens: torch.Tensor
    repetition_penalty: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor | None = None
    top_k_bound: int = 0  # a power of two >= top_k: the graph holds topk(top_k_bound), not one graph per top_k
    top_p_cut: torch.Tensor | None = None  # 1 - top_p, computed in float64 as transformers does before comparing
    # Whether the penalty and the minimum length are on: off, their ops are skipped (a graph each way), where they
    # would leave the scores as they were at the cost of a few passes over the vocabulary per token.
    penalize: bool = True
    hold_ends: bool = True

    @classmethod
    def from_processors(
        cls,
        processors: LogitsProcessorList,
        do_sample: bool,
        prompt_length: int,
        vocab_size: int,
        device: torch.device,
    ) -> "Sampling | None":
        """The settings of transformers' processors, or None if one of them is not reproduced here."""
        scalar = lambda value, dtype=torch.float32: torch.tensor(value, dtype=dtype, device=device)  # noqa: E731
        end_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        settings = {"min_new_tokens": 0, "repetition_penalty": 1.0, "temperature": 1.0}
        top_k = top_p_cut = None
        top_k_bound = 0
        for processor in processors:
            if isinstance(processor, RepetitionPenaltyLogitsProcessor):
                settings["repetition_penalty"] = processor.penalty
            elif isinstance(processor, MinLengthLogitsProcessor):
                end_mask[processor.eos_token_id.to(device)] = True
                settings["min_new_tokens"] = max(settings["min_new_tokens"], processor.min_length - prompt_length)
            elif isinstance(processor, MinNewTokensLengthLogitsProcessor):
                end_mask[processor.eos_token_id.to(device)] = True
                settings["min_new_tokens"] = max(settings["min_new_tokens"], processor.min_new_tokens)
            elif isinstance(processor, TemperatureLogitsWarper):
                settings["temperature"] = processor.temperature
            elif isinstance(processor, TopKLogitsWarper):
                k = min(processor.top_k, vocab_size)
                top_k, top_k_bound = scalar(k, torch.long), min(vocab_size, 1 << (k - 1).bit_length())
            elif isinstance(processor, TopPLogitsWarper) and processor.min_tokens_to_keep == 1:
                top_p_cut = scalar(1 - processor.top_p)
            else:
                return None
        return cls(
            do_sample=do_sample,
            penalize=settings["repetition_penalty"] != 1.0,
            hold_ends=settings["min_new_tokens"] > 0 and bool(end_mask.any()),
            end_mask=end_mask,
            min_new_tokens=scalar(settings["min_new_tokens"], torch.long),
            repetition_penalty=scalar(settings["repetition_penalty"]),
            temperature=scalar(settings["temperature"]),
            top_k=top_k,
            top_k_bound=top_k_bound,
            top_p_cut=top_p_cut,
        )


def seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[batch, vocab] bool: the ids each prompt holds after its left padding, which the repetition penalty skips."""
    padding = (attention_mask != 0).int().argmax(dim=1, keepdim=True)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    ids = input_ids.masked_fill(positions < padding, vocab_size)  # the padding lands in a column that is dropped
    seen = torch.zeros((input_ids.shape[0], vocab_size + 1), dtype=torch.bool, device=input_ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab_size].contiguous()


def process_scores(
    logits: torch.Tensor, seen: torch.Tensor, generated: torch.Tensor, sampling: Sampling
) -> torch.Tensor:
    """The scores `generate()` chooses from, given the last position's logits, the ids seen so far and the number of
    tokens generated so far. A neutral setting leaves the scores bit for bit as they were (x * 1 and x / 1 are exact)."""
    scores = logits.float()
    if sampling.penalize:
        penalty = sampling.repetition_penalty
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    if sampling.hold_ends:
        scores = scores.masked_fill(sampling.end_mask & (generated < sampling.min_new_tokens), FILTERED)
    if not sampling.do_sample:
        return scores
    scores = scores / sampling.temperature
    if sampling.top_k is not None:
        kth = scores.topk(sampling.top_k_bound).values.index_select(-1, (sampling.top_k - 1).reshape(1))
        scores = scores.masked_fill(scores < kth, FILTERED)
    if sampling.top_p_cut is not None:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= sampling.top_p_cut
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), FILTERED)
    return scores


def choose(scores: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, 1] token ids from processed scores, as `generate()` draws them."""
    if not sampling.do_sample:
        return scores.argmax(-1, keepdim=True)
    return torch.multinomial(scores.softmax(-1), num_samples=1, generator=generator)
