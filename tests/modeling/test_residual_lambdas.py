"""`residual_lambdas`: each block's input mixes the residual stream and the embeddings with two learned scalars."""

import pytest
import torch
from glade import GladeConfig, GladeForCausalLM
from glade.tiny import tiny_model

IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny(**options) -> GladeForCausalLM:
    return tiny_model(n_layer=3, vocab_size=97, positions="rotary", **options)


def plain_twin(model: GladeForCausalLM) -> GladeForCausalLM:
    """The same weights in a model without the lambdas."""
    plain = tiny()
    loaded = plain.load_state_dict(model.state_dict(), strict=False)
    assert sorted(loaded.unexpected_keys) == ["transformer.resid_lambdas", "transformer.x0_lambdas"]
    assert not loaded.missing_keys
    return plain


@torch.no_grad()
def test_the_lambdas_start_where_the_model_is_a_plain_transformer():
    model = tiny(residual_lambdas=True)
    assert model.transformer.resid_lambdas.tolist() == [1.0] * 3
    assert model.transformer.x0_lambdas.tolist() == [0.0] * 3
    assert torch.equal(model(IDS).logits, plain_twin(model)(IDS).logits)


@torch.no_grad()
def test_each_block_reads_the_lambdas_mix_of_stream_and_embeddings():
    model = tiny(residual_lambdas=True)
    model.transformer.resid_lambdas.copy_(torch.tensor([0.5, 2.0, -1.0]))
    model.transformer.x0_lambdas.copy_(torch.tensor([0.25, -0.5, 3.0]))
    # The slow reference: the plain twin, with each block's input rewritten by a hook.
    plain = plain_twin(model)
    embeddings = {}
    plain.transformer.drop.register_forward_hook(lambda module, args, output: embeddings.update(x0=output))
    for index, block in enumerate(plain.transformer.h):
        def mix(module, args, kwargs, index=index):
            resid, x0 = model.transformer.resid_lambdas[index], model.transformer.x0_lambdas[index]
            return (resid * args[0] + x0 * embeddings["x0"], *args[1:]), kwargs
        block.register_forward_pre_hook(mix, with_kwargs=True)
    logits = model(IDS).logits
    torch.testing.assert_close(logits, plain(IDS).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, plain_twin(model)(IDS).logits, atol=1e-2)

    # Decoding through the cache recomputes no block input from the whole sequence: the same next tokens.
    greedy = model.generate(IDS[:1, :4], max_new_tokens=8, do_sample=False, fast_decoding="off")
    recomputed = IDS[:1, :4]
    for _ in range(8):
        recomputed = torch.cat([recomputed, model(recomputed).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy, recomputed)


def test_both_lambdas_learn_and_are_counted_saved_and_reloaded(tmp_path):
    model = tiny(residual_lambdas=True).train()
    model(IDS, labels=IDS).loss.backward()
    assert model.transformer.resid_lambdas.grad.abs().min() > 0
    assert model.transformer.x0_lambdas.grad.abs().min() > 0
    with torch.no_grad():
        model.transformer.x0_lambdas.fill_(0.3)
    model.save_pretrained(tmp_path)
    reloaded = GladeForCausalLM.from_pretrained(tmp_path)
    assert reloaded.transformer.x0_lambdas.tolist() == pytest.approx([0.3] * 3)
    assert torch.equal(reloaded.eval()(IDS).logits, model.eval()(IDS).logits)


def test_a_non_bool_is_refused():
    with pytest.raises(ValueError, match="GladeConfig.residual_lambdas must be a bool, got 'yes'"):
        GladeConfig(residual_lambdas="yes")
