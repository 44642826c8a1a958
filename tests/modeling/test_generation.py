import pytest
import torch
from transformers import CompileConfig, pipeline

from glade.tiny import tiny_model

PROMPT = torch.tensor([[10, 20, 30, 40, 50, 60]])


def greedy(model, ids, **options):
    return model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=256, **options)


def test_greedy_with_cache_equals_without(model):
    with_cache = greedy(model, PROMPT, use_cache=True)
    without = greedy(model, PROMPT, use_cache=False)
    assert with_cache.shape == (1, 18)
    assert torch.equal(with_cache, without)


@pytest.mark.slow
def test_greedy_equals_a_slow_argmax_loop(model):
    ids = PROMPT
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy(model, PROMPT), ids)


@pytest.mark.slow
def test_static_cache_equals_dynamic(model):
    assert torch.equal(greedy(model, PROMPT, cache_implementation="static"), greedy(model, PROMPT))


@pytest.mark.slow
def test_compiled_static_cache_decoding_matches(model):
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles decoding only on accelerators by default
    compiled = greedy(model, PROMPT, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(compiled, greedy(model, PROMPT))


def test_left_padded_batch_gives_each_row_its_own_tokens(model):
    short = torch.tensor([[7, 8, 9]])
    batch = torch.cat([torch.cat([torch.full((1, 3), 256), short], dim=1), PROMPT])
    mask = (batch != 256).long()
    together = greedy(model, batch, attention_mask=mask)
    assert torch.equal(together[0, 6:], greedy(model, short)[0, 3:])
    assert torch.equal(together[1, 6:], greedy(model, PROMPT)[0, 6:])


@pytest.mark.slow
def test_sampling_with_a_seed_is_reproducible(model):
    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(PROMPT, max_new_tokens=20, do_sample=True, top_k=50, temperature=1.5, pad_token_id=256)

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))


def test_beam_search_returns_its_best_beams(model):
    out = model.generate(
        PROMPT, max_new_tokens=8, num_beams=3, num_return_sequences=3, do_sample=False, pad_token_id=256,
        output_scores=True, return_dict_in_generate=True,
    )
    assert out.sequences.shape == (3, 14)
    assert torch.equal(out.sequences[:, :6], PROMPT.expand(3, -1))
    assert out.sequences_scores[0] >= out.sequences_scores[1] >= out.sequences_scores[2]


def test_assisted_decoding_matches_greedy(model):
    assistant = tiny_model(seed=1, n_layer=1)
    assert torch.equal(greedy(model, PROMPT, assistant_model=assistant), greedy(model, PROMPT))


def test_old_past_key_values_name_is_still_honoured(model):
    with torch.no_grad():
        prefix = model(PROMPT[:, :4], use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values"):
            rest = model(PROMPT[:, 4:], past_key_values=prefix.cache).logits
        full = model(PROMPT).logits
    torch.testing.assert_close(rest, full[:, 4:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("batched", [False, True])
def test_text_generation_pipeline(model, tokenizer, batched):
    tokenizer.padding_side = "left"
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["Once upon a time", "Hi"] if batched else "Once upon a time"
    results = generator(prompts, max_new_tokens=5, do_sample=False, batch_size=2, return_tensors=True)
    texts = generator(prompts, max_new_tokens=5, do_sample=False, batch_size=2)
    if not batched:
        results, texts, prompts = [results], [texts], [prompts]
    for prompt, result, text in zip(prompts, results, texts):
        # Token ids, not text: five random byte tokens need not decode to text that re-encodes to five tokens.
        ids, prompt_ids = result[0]["generated_token_ids"], tokenizer(prompt)["input_ids"]
        assert ids[-5 - len(prompt_ids):-5] == prompt_ids  # the prompt, then five new tokens (after any padding)
        assert text[0]["generated_text"].startswith(prompt)
        alone = generator(prompt, max_new_tokens=5, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
        assert ids[-len(alone):] == alone  # a batch with padding gives each prompt its own continuation
