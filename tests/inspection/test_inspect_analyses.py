import logging
import math

import pytest
import torch

from glade.inspection import (
    attention_maps,
    generation_steps,
    logit_lens,
    next_token_distribution,
    plot_attention,
    plot_generation_steps,
    plot_logit_lens,
    plot_next_token,
    strongest_links,
    token_text,
)
from glade.tiny import tiny_model

PROMPT = "Harry Potter was a highly unusual boy"


def _logits(model, tokenizer, text):
    with torch.no_grad():
        return model(tokenizer(text, return_tensors="pt").input_ids).logits[0]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_next_token_probabilities_are_the_tempered_softmax(model, tokenizer, temperature):
    prediction = next_token_distribution(model, tokenizer, PROMPT, top_k=7, temperature=temperature)
    logits = _logits(model, tokenizer, PROMPT)[-1]
    reference = torch.softmax(logits / temperature, dim=-1)
    top = reference.topk(7)

    assert [c.token_id for c in prediction.candidates] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([c.probability for c in prediction.candidates]), top.values)
    torch.testing.assert_close(torch.tensor([c.logit for c in prediction.candidates]), logits[top.indices])
    assert sum(c.probability for c in prediction.candidates) <= 1.0
    assert prediction.prompt_tokens[-4:] == ["␣", "b", "o", "y"]


def test_whole_vocabulary_sums_to_one(model, tokenizer):
    prediction = next_token_distribution(model, tokenizer, "ab", top_k=model.config.vocab_size)
    assert sum(c.probability for c in prediction.candidates) == pytest.approx(1.0, abs=1e-5)


def test_next_token_plot_is_a_png(model, tokenizer, tmp_path, assert_png):
    prediction = next_token_distribution(model, tokenizer, PROMPT, top_k=5)
    figure = plot_next_token(prediction, tmp_path / "next.png")
    assert_png(tmp_path / "next.png")
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == [c.token for c in prediction.candidates]


@pytest.mark.slow
def test_generation_steps_follow_a_plain_greedy_loop(model, tokenizer, tmp_path, assert_png):
    steps = generation_steps(model, tokenizer, "Once upon", max_new_tokens=4, top_k=3)
    assert len(steps) == 4
    ids = tokenizer("Once upon", return_tensors="pt").input_ids
    for step in steps:
        with torch.no_grad():
            probabilities = torch.softmax(model(ids).logits[0, -1], dim=-1)
        top = probabilities.topk(4)
        assert step.chosen.token_id == top.indices[0]
        assert step.chosen.probability == pytest.approx(float(top.values[0]), rel=1e-5)
        assert [r.token_id for r in step.runners_up] == top.indices[1:].tolist()
        ids = torch.cat([ids, torch.tensor([[step.chosen.token_id]])], dim=1)  # ids: stray bytes need not re-encode

    figure = plot_generation_steps(steps, tmp_path / "steps.png")
    assert_png(tmp_path / "steps.png")
    assert len(figure.axes[0].texts) == 4 * 4


def test_steps_stop_at_the_end_of_the_context_with_a_warning(model, tokenizer, caplog):
    context = model.config.n_positions
    with caplog.at_level(logging.WARNING, logger="glade.generate"):
        steps = generation_steps(model, tokenizer, "x" * (context - 3), max_new_tokens=10)  # a token per byte
    assert len(steps) == 3
    assert f"generating at most 3 new tokens instead of 10: with the {context - 3}-token prompt" in caplog.text
    with pytest.raises(ValueError, match=f"the prompt is {context} tokens long and the model's context holds"):
        generation_steps(model, tokenizer, "x" * context)


def _layer0_attention_by_hand(model, input_ids):
    """Layer 0's attention weights from its parameters: softmax(q k^T / sqrt(d) + causal mask)."""
    config, block = model.config, model.transformer.h[0]
    positions = torch.arange(input_ids.shape[1])
    x = block.ln_1(model.transformer.wte(input_ids[0]) + model.transformer.wpe(positions))
    q, k, _ = block.attn.c_attn(x).split(config.n_embd, dim=-1)
    head_dim = config.n_embd // config.n_head
    q = q.view(-1, config.n_head, head_dim).transpose(0, 1)
    k = k.view(-1, config.n_head, head_dim).transpose(0, 1)
    scores = q @ k.transpose(1, 2) / head_dim**0.5
    future = torch.ones(len(positions), len(positions), dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


@pytest.mark.slow
def test_attention_maps_are_the_models_attention(tokenizer, tmp_path, assert_png):
    model = tiny_model(seed=1)  # loaded with sdpa: attention_maps must switch it to eager itself
    text = "a fluffy cat"
    maps = attention_maps(model, tokenizer, text, layer=1)
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(input_ids, output_attentions=True).attentions

    assert maps.heads == [0, 1, 2, 3]
    assert maps.tokens == [token_text(tokenizer, i) for i in input_ids[0].tolist()]
    torch.testing.assert_close(maps.weights, reference[1][0])
    torch.testing.assert_close(maps.weights.sum(-1), torch.ones(4, len(maps.tokens)))
    assert torch.all(maps.weights.triu(1) == 0)
    with torch.no_grad():
        torch.testing.assert_close(attention_maps(model, tokenizer, text, layer=0).weights,
                                   _layer0_attention_by_hand(model, input_ids))

    single = attention_maps(model, tokenizer, text, layer=1, head=2)
    torch.testing.assert_close(single.weights, reference[1][0, [2]])

    grid = plot_attention(maps, tmp_path / "all.png")
    assert len([ax for ax in grid.axes if ax.images]) == 4
    assert len(grid.axes) == 4 + 1  # the panels and one shared colour bar
    one = plot_attention(single, tmp_path / "one.png")
    assert len([ax for ax in one.axes if ax.images]) == 1
    assert_png(tmp_path / "all.png")
    assert_png(tmp_path / "one.png")


def test_attention_grid_drops_unused_panels(tokenizer):
    model = tiny_model(n_head=8, n_embd=64)
    figure = plot_attention(attention_maps(model, tokenizer, "abc", layer=0))
    assert len([ax for ax in figure.axes if ax.images]) == 8  # a 3 x 3 grid, one panel removed


def test_strongest_links_are_the_largest_weights(model, tokenizer):
    maps = attention_maps(model, tokenizer, "the cat sat", layer=0)
    links = strongest_links(maps, top_n=5)
    weights = [link.weight for link in links]
    assert weights == sorted(weights, reverse=True)
    assert weights[0] == pytest.approx(float(maps.weights[:, 1:].max()))
    for link in links:
        assert link.query_position >= 1 and link.key_position <= link.query_position
        assert maps.weights[maps.heads.index(link.head), link.query_position, link.key_position] == link.weight
        assert link.key_token == maps.tokens[link.key_position]


@pytest.mark.slow
def test_logit_lens_reads_every_layer_through_the_final_norm(model, tokenizer, tmp_path, assert_png):
    prompt = "The cat"
    lens = logit_lens(model, tokenizer, prompt)
    assert lens.layers == ["embeddings", "layer 0", "layer 1"]
    assert len(lens.predictions) == 3 and all(len(row) == len(lens.tokens) for row in lens.predictions)

    # The last layer is the model's own prediction.
    probabilities = torch.softmax(_logits(model, tokenizer, prompt), dim=-1)
    assert [p.token_id for p in lens.predictions[-1]] == probabilities.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor([p.probability for p in lens.predictions[-1]]),
                               probabilities.max(-1).values)
    # The first row reads the embeddings alone: unembed(ln_f(wte (+ wpe))); rotary positions act inside attention.
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        embedded = model.transformer.wte(input_ids)
        if model.config.positions == "learned":
            embedded = embedded + model.transformer.wpe(torch.arange(len(input_ids)))
        first = torch.softmax(model.unembed(model.transformer.ln_f(embedded)), dim=-1)
    assert [p.token_id for p in lens.predictions[0]] == first.argmax(-1).tolist()

    figure = plot_logit_lens(lens, tmp_path / "lens.png")
    assert_png(tmp_path / "lens.png")
    assert len(figure.axes[0].texts) == 3 * len(lens.tokens)


def test_bad_input_is_a_clear_error(model, tokenizer):
    with pytest.raises(ValueError, match="prompt is empty"):
        next_token_distribution(model, tokenizer, "")
    for temperature in (0, 1e-300, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature must be at least 0.0001 and finite"):
            next_token_distribution(model, tokenizer, "a", temperature=temperature)
    with pytest.raises(ValueError, match="top_k must be between 1 and the vocabulary size 257"):
        next_token_distribution(model, tokenizer, "a", top_k=0)
    with pytest.raises(ValueError, match=r"layer 2 is out of range: this model has 2 layers, numbered 0\.\.1"):
        attention_maps(model, tokenizer, "a b", layer=2)
    with pytest.raises(ValueError, match=r"head -1 is out of range: this model has 4 heads, numbered 0\.\.3"):
        attention_maps(model, tokenizer, "a b", layer=0, head=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generation_steps(model, tokenizer, "a", max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        logit_lens(model, tokenizer, "")
