"""`model.generate()` and the pipeline on the fast decoder: transformers' tokens, greedy or seeded, and transformers'
own generate() for every request the fast route does not reproduce."""

import threading

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MaxTimeCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)
from transformers.generation.logits_process import TemperatureLogitsWarper

from glade import fast_generate
from glade.decoding import CompiledDecoder
from glade.tiny import byte_level_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = torch.tensor([[256, 256, 256, 7, 8, 9], [10, 20, 30, 40, 50, 60], [256, 11, 12, 13, 14, 15]])
MASK = (PROMPTS != 256).long()
SETTINGS = {
    "greedy": dict(do_sample=False),
    "greedy, penalty and minimum": dict(do_sample=False, repetition_penalty=1.3, min_new_tokens=12),
    "temperature and top-k": dict(do_sample=True, temperature=0.7, top_k=10),
    "top-p, penalty": dict(do_sample=True, top_k=0, top_p=0.8, repetition_penalty=1.2),
    "everything": dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.15,
                       min_new_tokens=8),
}


@pytest.fixture(autouse=True)
def _room_for_every_config():
    # The compiled tests build several graphs; torch.compile's default of 8 entries per function would be reached.
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


def seeded(model, route: str, seed: int = 3, **options) -> torch.Tensor:
    options = {"max_new_tokens": 24, "pad_token_id": 256, **options}
    return model.generate(
        PROMPTS, attention_mask=MASK, fast_decoding=route, generator=torch.Generator().manual_seed(seed), **options
    )


def fast_route_runs(model) -> int:
    """How many decoders the fast route holds for `model`: 0 while every request went to transformers."""
    pool = fast_generate._pools.get(model)
    return len(pool.decoders) if pool else 0


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS)
def test_eager_route_gives_generates_tokens_for_a_seed(model, settings):
    expected = seeded(model, "off", **settings)
    assert torch.equal(seeded(model, "eager", **settings), expected)
    assert fast_route_runs(model) == 1
    if settings["do_sample"]:
        assert not torch.equal(seeded(model, "eager", seed=4, **settings), expected)  # the seed matters


def test_compiled_route_gives_generates_tokens_for_a_seed_and_reuses_its_graph_for_new_values(gpt2_model):
    sampling = SETTINGS["everything"]
    assert torch.equal(seeded(gpt2_model, "compiled", **sampling), seeded(gpt2_model, "off", **sampling))
    torch._dynamo.utils.counters.clear()
    # top_k 17 and 20 are both filtered from the 32 best, so they share a graph.
    other = dict(sampling, temperature=0.8, top_k=17, top_p=0.7, repetition_penalty=1.4, min_new_tokens=3)
    assert torch.equal(seeded(gpt2_model, "compiled", seed=9, **other), seeded(gpt2_model, "off", seed=9, **other))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_end_ids_end_rows_as_generate_does(gpt2_model):
    sampling = SETTINGS["temperature and top-k"]
    rows = seeded(gpt2_model, "off", max_new_tokens=30, **sampling)[:, 6:].tolist()
    end_ids = [rows[0][5], rows[1][12], rows[2][20]]  # every row ends by its 21st token, at different steps
    expected = seeded(gpt2_model, "off", max_new_tokens=30, eos_token_id=end_ids, **sampling)
    assert expected.shape[1] <= 6 + 21 and (expected[:, 6:] == 256).any()
    assert torch.equal(seeded(gpt2_model, "eager", max_new_tokens=30, eos_token_id=end_ids, **sampling), expected)


def test_auto_compiles_long_requests_and_every_request_of_a_batch_size_compiled_before(gpt2_model, monkeypatch):
    """Where the C step cannot run (here: made unavailable)."""
    monkeypatch.setattr(fast_generate, "unavailable", lambda model: "no compiler")
    monkeypatch.setattr(fast_generate, "COMPILE_MIN_NEW_TOKENS", 20)
    seeded(gpt2_model, "auto", max_new_tokens=8)
    assert list(fast_generate.decoder_pool(gpt2_model).decoders) == [(3, "eager")]
    seeded(gpt2_model, "auto", max_new_tokens=20)
    seeded(gpt2_model, "auto", max_new_tokens=4)
    assert list(fast_generate.decoder_pool(gpt2_model).decoders) == [(3, "eager"), (3, "compiled")]
    assert fast_generate.decoder_pool(gpt2_model).decoders[(3, "compiled")].compiled


FALLBACKS = {
    "beam search": dict(num_beams=2),
    "several sequences": dict(do_sample=True, num_return_sequences=2),
    "an unsupported processor": dict(no_repeat_ngram_size=2),
    "min-p": dict(do_sample=True, min_p=0.1),
    "scores returned": dict(return_dict_in_generate=True, output_scores=True),
    "no cache": dict(use_cache=False),
    "a static cache": dict(cache_implementation="static"),
    "custom processors": dict(logits_processor=LogitsProcessorList([TemperatureLogitsWarper(0.5)]), do_sample=True),
    "custom stopping": dict(stopping_criteria=StoppingCriteriaList([MaxTimeCriteria(60)])),
    "a time limit": dict(max_time=60.0),
    "turned off by keyword": dict(fast_decoding="off"),
    "turned off in the config": dict(generation_config=GenerationConfig(fast_decoding="off", max_new_tokens=6)),
}


@pytest.mark.parametrize("options", FALLBACKS.values(), ids=FALLBACKS)
def test_requests_it_does_not_reproduce_go_to_transformers(gpt2_model, monkeypatch, options):
    monkeypatch.setattr(CompiledDecoder, "generate", lambda *args, **kwargs: pytest.fail("took the fast route"))
    options = {"max_new_tokens": 6, "pad_token_id": 256, **options}
    if "generation_config" in options:
        options.pop("max_new_tokens")
    output = gpt2_model.generate(PROMPTS, attention_mask=MASK, **options)
    assert (output.sequences if hasattr(output, "sequences") else output).shape[1] > PROMPTS.shape[1]


def test_batches_over_eight_rows_and_embeddings_go_to_transformers(gpt2_model, monkeypatch):
    monkeypatch.setattr(CompiledDecoder, "generate", lambda *args, **kwargs: pytest.fail("took the fast route"))
    gpt2_model.generate(PROMPTS[1:2].repeat(9, 1), max_new_tokens=3, pad_token_id=256)
    embeddings = gpt2_model.get_input_embeddings()(PROMPTS[1:2])
    gpt2_model.generate(inputs_embeds=embeddings, max_new_tokens=3, pad_token_id=256)


@pytest.mark.parametrize("mask", [
    torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),  # right padding
    torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]),  # a hole
], ids=["right padding", "a hole"])
def test_a_mask_that_is_not_left_padding_gets_generates_tokens(gpt2_model, monkeypatch, mask):
    """transformers derives positions and masks from any mask; the fast decoder's cache is laid out for left padding
    only, so other masks go to transformers (its common tests generate with right-padded masks)."""
    prompts = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=256)
    expected = gpt2_model.generate(prompts, fast_decoding="off", **options)
    monkeypatch.setattr(CompiledDecoder, "generate", lambda *args, **kwargs: pytest.fail("took the fast route"))
    assert torch.equal(gpt2_model.generate(prompts, **options), expected)


def test_a_seeded_generator_draws_the_same_tokens_on_transformers_route(gpt2_model):
    sampling = dict(do_sample=True, top_k=0)
    assert torch.equal(seeded(gpt2_model, "off", **sampling), seeded(gpt2_model, "off", **sampling))
    assert not torch.equal(seeded(gpt2_model, "off", **sampling), seeded(gpt2_model, "off", seed=4, **sampling))


def test_an_unknown_route_is_refused_by_name(gpt2_model):
    with pytest.raises(ValueError, match="fast_decoding must be one of auto, native, int8, compiled, eager, off, got 'fast'"):
        gpt2_model.generate(PROMPTS, fast_decoding="fast")


def test_context_fills_to_the_last_position(gpt2_model):
    context = gpt2_model.config.n_positions
    prompt = PROMPTS[1:2]
    expected = gpt2_model.generate(prompt, max_new_tokens=context - 6, do_sample=False, fast_decoding="off")
    assert expected.shape[1] == context
    assert torch.equal(gpt2_model.generate(prompt, max_new_tokens=context - 6, do_sample=False), expected)


def test_pipeline_takes_the_fast_route_with_left_padded_batches(gpt2_model):
    tokenizer = byte_level_tokenizer()
    tokenizer.padding_side = "left"
    generator = pipeline("text-generation", model=gpt2_model, tokenizer=tokenizer)
    prompts = ["Once upon", "a time, in a land", "far", "away there lived", "a", "king who", "had", "eight sons"]
    options = dict(max_new_tokens=10, do_sample=False, batch_size=8, pad_token_id=256)
    expected = generator(prompts, fast_decoding="off", **options)
    assert fast_route_runs(gpt2_model) == 0
    assert generator(prompts, **options) == expected
    assert list(fast_generate.decoder_pool(gpt2_model).decoders) == [(8, "native")]


def test_streamers_get_what_generate_streams(gpt2_model, capsys):
    tokenizer = byte_level_tokenizer()
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=256)
    gpt2_model.generate(ids, streamer=TextStreamer(tokenizer), fast_decoding="off", **options)
    expected = capsys.readouterr().out
    gpt2_model.generate(ids, streamer=TextStreamer(tokenizer), **options)
    assert capsys.readouterr().out == expected and expected.startswith("Hello there")
    assert fast_route_runs(gpt2_model) == 1


def test_a_chat_ui_streams_through_the_pipeline_from_another_thread(gpt2_model):
    tokenizer = byte_level_tokenizer()
    generator = pipeline("text-generation", model=gpt2_model, tokenizer=tokenizer)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    options = dict(max_new_tokens=16, do_sample=False, pad_token_id=256, return_full_text=False)
    worker = threading.Thread(target=generator, args=("Hello",), kwargs=dict(streamer=streamer, **options))
    worker.start()
    streamed = "".join(streamer)
    worker.join()
    assert streamed == generator("Hello", fast_decoding="off", **options)[0]["generated_text"]
    assert fast_route_runs(gpt2_model) == 1


def requests_from_threads(decode, requests: list, threads: int) -> list:
    """decode(request) for every request, from `threads` threads at once."""
    results: list = [None] * len(requests)

    def work(first: int) -> None:
        for index in range(first, len(requests), threads):
            results[index] = decode(requests[index])

    workers = [threading.Thread(target=work, args=(first,)) for first in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


# 8 threads x 20 requests of three prompt lengths: the process survives, and every output is the sequential one.
CONCURRENT = [PROMPTS[row % 3 : row % 3 + 1, 3 - row % 3 :] for row in range(160)]


def test_threads_sharing_one_model_get_their_own_tokens_through_generate_and_the_pipeline(gpt2_model):
    def decode(ids: torch.Tensor) -> torch.Tensor:
        return gpt2_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=256)

    expected = [decode(ids) for ids in CONCURRENT]
    assert all(torch.equal(got, want) for got, want in zip(requests_from_threads(decode, CONCURRENT, 8), expected))

    tokenizer = byte_level_tokenizer()
    generator = pipeline("text-generation", model=gpt2_model, tokenizer=tokenizer)
    texts = [tokenizer.decode(ids[0]) for ids in CONCURRENT]
    wanted = [generator(text, max_new_tokens=8, do_sample=False, pad_token_id=256) for text in texts]
    answers = requests_from_threads(
        lambda text: generator(text, max_new_tokens=8, do_sample=False, pad_token_id=256), texts, 8
    )
    assert answers == wanted


def test_threads_sharing_one_compiled_decoder_take_turns(gpt2_model):
    decoder = CompiledDecoder(gpt2_model, max_length=32)
    expected = [decoder.generate(ids, 8) for ids in CONCURRENT]
    results = requests_from_threads(lambda ids: decoder.generate(ids, 8), CONCURRENT, 8)
    assert all(torch.equal(got, want) for got, want in zip(results, expected))
