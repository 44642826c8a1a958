"""transformers' continuous batching (`model.generate_batch`, the engine of `transformers serve --continuous-batching`)
gives every request the tokens greedy `generate()` gives it alone, on both architectures.

Continuous batching packs all requests into one row and calls the model with its own `position_ids` and a
`PagedAttentionCache` (no `Cache`: it has no length), so Glade's positions must come from those ids alone.
"""

from collections import Counter

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from architectures import ARCHITECTURES
from glade.tiny import tiny_model

# Each generate_batch call starts a generation thread, warms up and stops it: about a second.
pytestmark = pytest.mark.slow

NEW_TOKENS = 10
# 16 prompts of mixed lengths (3 to 40 tokens), ids below 256: the tiny model's <|endoftext|> is 256.
LENGTHS = [3, 40, 7, 25, 12, 38, 4, 31, 18, 9, 36, 5, 22, 15, 29, 11]


def batching_config() -> ContinuousBatchingConfig:
    # A batch of 16 tokens, fewer than the longest prompts: those are prefilled in chunks, over steps that also decode
    # other requests. A small cache, given outright: sizing one from free memory takes seconds on a CPU.
    return ContinuousBatchingConfig(page_size=16, num_blocks=64, max_batch_tokens=16, max_requests_per_batch=16)


def greedy(model, prompt: list[int], **options) -> list[int]:
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, **options)
    return ids[0, len(prompt):].tolist()


def generated(outputs: dict, prompts: list[list[int]]) -> list[list[int]]:
    """The generated tokens, in prompt order, once every request is checked to have finished without an error."""
    results = list(outputs.values())
    assert [result.error for result in results] == [None] * len(prompts)
    assert [result.prompt_ids for result in results] == prompts
    return [result.generated_tokens for result in results]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def case(request):
    """A model of the architecture, 16 prompts, and each prompt's greedy tokens from transformers' own generate()."""
    # A wider init than the default, so that greedy continuations vary from token to token.
    model = tiny_model(initializer_range=0.2, **ARCHITECTURES[request.param])
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (length,), generator=generator).tolist() for length in LENGTHS]
    alone = [greedy(model, prompt, fast_decoding="off") for prompt in prompts]
    assert len({tuple(tokens) for tokens in alone}) == len(prompts)
    return model, prompts, alone


# transformers 5.25 reads "paged|sdpa" as "sdpa" as soon as it is given (a deprecated alias): sdpa is the case.
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_each_request_gets_the_tokens_generate_gives_it_alone(case, attn_implementation):
    model, prompts, alone = case
    # Continuous batching runs "eager" as "paged|eager", and gives the model back its own implementation after.
    model.set_attn_implementation(attn_implementation)
    try:
        outputs = model.generate_batch(
            prompts, max_new_tokens=NEW_TOKENS, continuous_batching_config=batching_config()
        )
    finally:
        model.set_attn_implementation("sdpa")
    assert generated(outputs, prompts) == alone
    assert all(len(tokens) == NEW_TOKENS for tokens in alone)  # the model's <|endoftext|> ended none of them


def test_generates_route_agrees_with_transformers_generate(case):
    # generate() decodes on Glade's fast route by default: the tokens above are the ones users get from it too.
    model, prompts, alone = case
    assert [greedy(model, prompt) for prompt in prompts] == alone


def test_a_request_stops_at_its_end_token_as_generate_does(case):
    model, prompts, alone = case
    # As end token, the token most requests make before their last step, among those some request never makes:
    # it ends some requests early and leaves others to run to max_new_tokens.
    made = Counter(token for tokens in alone for token in set(tokens[:-1]))
    eos = next(token for token, _ in made.most_common() if any(token not in tokens for tokens in alone))
    expected = [tokens[: tokens.index(eos) + 1] if eos in tokens else tokens for tokens in alone]
    stopped = [i for i, tokens in enumerate(expected) if len(tokens) < NEW_TOKENS]
    assert stopped and len(stopped) < len(prompts)

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=256)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching_config())
    assert generated(outputs, prompts) == expected
    assert [greedy(model, prompts[i], eos_token_id=eos, fast_decoding="off") for i in stopped] == [
        expected[i] for i in stopped
    ]
