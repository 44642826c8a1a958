"""`value_embeddings`: every other block adds a gated, learned embedding of each token to its attention values."""

import pytest
import torch
from glade import GladeConfig, GladeForCausalLM
from glade.tiny import tiny_model
from glade.training.optim import make_optimizer

IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny(**options) -> GladeForCausalLM:
    return tiny_model(n_layer=3, vocab_size=97, positions="rotary", **options)


@pytest.mark.parametrize("n_layer, layers", [(3, (0, 2)), (4, (1, 3)), (1, (0,))])
def test_every_other_block_ending_with_the_last_has_a_table_and_a_gate(n_layer, layers):
    model = GladeForCausalLM(GladeConfig(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=50, value_embeddings=True))
    assert model.config.value_embedding_layers == layers
    assert sorted(int(key) for key in model.transformer.value_embeds) == list(layers)
    assert [index for index, block in enumerate(model.transformer.h) if hasattr(block.attn, "ve_gate")] == list(layers)
    assert model.transformer.h[layers[-1]].attn.ve_gate.weight.shape == (2, 16)  # 16 < 32 channels: all of them
    gates = [model.transformer.h[layer].attn.ve_gate.weight for layer in layers]
    assert all(gate.abs().sum() == 0 for gate in gates)  # zero: each gate starts at 2 sigmoid(0) = 1


@torch.no_grad()
@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
def test_values_gain_the_gated_embedding_of_each_token(n_kv_head):
    model = tiny(value_embeddings=True, n_kv_head=n_kv_head)
    for block in model.transformer.h[::2]:
        block.attn.ve_gate.weight.normal_()  # a gate that differs per head and token, not the initial 1
    # The slow reference: a model without value embeddings, whose q|k|v output gets them added by a hook.
    plain = tiny(n_kv_head=n_kv_head)
    loaded = plain.load_state_dict(model.state_dict(), strict=False)
    assert not loaded.missing_keys and all("value_embeds" in key or "ve_gate" in key for key in loaded.unexpected_keys)
    query_size, kv_size = 64, n_kv_head * 16  # tiny_model: 64 wide, 4 heads of 16
    for layer in (0, 2):
        attention, table = model.transformer.h[layer].attn, model.transformer.value_embeds[str(layer)]

        def add_values(module, args, output, attention=attention, table=table):
            gate = 2 * torch.sigmoid(args[0][..., :32] @ attention.ve_gate.weight.T)  # [batch, seq, kv heads]
            embedded = table(IDS).unflatten(-1, (n_kv_head, 16)) * gate.unsqueeze(-1)
            values = output[..., query_size + kv_size:] + embedded.flatten(-2)
            return torch.cat([output[..., : query_size + kv_size], values], dim=-1)
        plain.transformer.h[layer].attn.c_attn.register_forward_hook(add_values)
    logits = model(IDS).logits
    torch.testing.assert_close(logits, plain(IDS).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_left_padded_row_computes_what_it_computes_alone():
    model = tiny(value_embeddings=True)
    padded = torch.cat([torch.full((1, 3), 96), IDS[:1, :5]], dim=1)
    logits = model(padded, attention_mask=(torch.arange(8) >= 3).long()[None]).logits[0, 3:]
    torch.testing.assert_close(logits, model(IDS[:1, :5]).logits[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cached_and_fast_decoding_give_the_tokens_of_recomputing_the_whole_sequence():
    model = tiny(value_embeddings=True, residual_lambdas=True)
    for block in model.transformer.h[::2]:
        block.attn.ve_gate.weight.normal_()
    model.transformer.x0_lambdas.fill_(0.5)
    prompt = IDS[:1, :4]
    recomputed = prompt
    for _ in range(8):
        recomputed = torch.cat([recomputed, model(recomputed).logits[:, -1:].argmax(-1)], dim=1)
    for route in ("off", "eager"):
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False, fast_decoding=route)
        assert torch.equal(generated, recomputed), route


@torch.no_grad()
def test_under_autocast_the_values_keep_the_dtype_they_have_without_value_embeddings():
    def value_dtypes(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [layer.values.dtype for layer in model(IDS, use_cache=True).cache.layers]

    # The table's rows are fp32 (embeddings are not autocast): added as they are, they would promote the values.
    assert value_dtypes(tiny(value_embeddings=True)) == value_dtypes(tiny()) == [torch.bfloat16] * 3


def test_inputs_embeds_are_refused_by_name():
    model = tiny(value_embeddings=True)
    with pytest.raises(ValueError, match="value embeddings look up each token's id: pass input_ids, not inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 64))


def test_tables_and_gates_learn_with_the_optimizer_each_belongs_to(tmp_path):
    model = tiny(value_embeddings=True).train()
    model(IDS, labels=IDS).loss.backward()
    for layer in (0, 2):
        assert model.transformer.value_embeds[str(layer)].weight.grad.abs().sum() > 0
        assert model.transformer.h[layer].attn.ve_gate.weight.grad.abs().sum() > 0
    adamw, muon = make_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=False).optimizers
    gates = {id(block.attn.ve_gate.weight) for block in model.transformer.h[::2]}
    tables = {id(table.weight) for table in model.transformer.value_embeds.values()}
    assert gates <= {id(param) for group in muon.param_groups for param in group["params"]}
    undecayed = next(group for group in adamw.param_groups if group["weight_decay"] == 0)
    assert tables <= {id(param) for param in undecayed["params"]}  # embeddings are not decayed

    model.save_pretrained(tmp_path)
    reloaded = GladeForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(IDS).logits, model.eval()(IDS).logits)
