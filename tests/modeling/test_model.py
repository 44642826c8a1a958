import math

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

import glade
from architectures import ARCHITECTURES
from glade.tiny import tiny_config, tiny_model


def test_auto_classes_resolve_to_glade():
    config = AutoConfig.for_model("glade", n_layer=2, n_embd=64, n_head=4, vocab_size=300)
    assert isinstance(config, glade.GladeConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), glade.GladeForCausalLM)
    assert isinstance(AutoModel.from_config(config), glade.GladeModel)
    assert isinstance(AutoModelForSequenceClassification.from_config(config), glade.GladeForSequenceClassification)
    assert isinstance(AutoModelForTokenClassification.from_config(config), glade.GladeForTokenClassification)
    assert isinstance(AutoModelForQuestionAnswering.from_config(config), glade.GladeForQuestionAnswering)


def test_parameter_names_follow_gpt2():
    names = set(tiny_model(n_layer=1).state_dict())
    for name in [
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias", "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.ln_2.bias", "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.bias",
        "transformer.ln_f.weight", "lm_head.weight",
    ]:
        assert name in names


def test_no_bias_config_drops_every_bias():
    model = tiny_model(bias=False)
    assert not [name for name, _ in model.named_parameters() if name.endswith(".bias")]


@pytest.mark.slow
def test_init_scales_residual_projections_by_depth():
    torch.manual_seed(0)
    config = glade.GladeConfig(n_layer=8, n_embd=256, n_head=4, vocab_size=512, n_positions=64)
    model = glade.GladeForCausalLM(config)
    residual_std = 0.02 / math.sqrt(2 * 8)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.count_nonzero(block.attn.c_attn.bias) == 0
        assert torch.equal(block.ln_1.weight, torch.ones(256))
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_tied_head_shares_storage_untied_does_not():
    tied = tiny_model()
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
    untied = tiny_model(tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()


@torch.no_grad()
def test_changing_a_token_changes_no_earlier_logit(model):
    ids = torch.randint(0, 256, (1, 16))
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % 256
    before, after = model(ids).logits, model(changed).logits
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


@pytest.mark.slow
@torch.no_grad()
def test_eager_sdpa_and_flex_agree_with_padding(model):
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in row 0
    logits = {}
    for impl in ("eager", "sdpa", "flex_attention"):
        model.set_attn_implementation(impl)
        logits[impl] = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits["eager"][real], logits["sdpa"][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits["eager"][real], logits["flex_attention"][real], atol=1e-5, rtol=0)


def test_attn_implementation_at_load(tmp_path, model):
    model.save_pretrained(tmp_path)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


@torch.no_grad()
def test_attentions_and_hidden_states():
    model = tiny_model(n_layer=3)
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 256, (2, 10))
    out = model(ids, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 3
    for weights in out.attentions:
        assert weights.shape == (2, 4, 10, 10)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 10))
        assert torch.count_nonzero(weights.triu(1)) == 0
    assert len(out.hidden_states) == 4
    torch.testing.assert_close(out.hidden_states[0], model.transformer.wte(ids) + model.transformer.wpe.weight[:10])
    torch.testing.assert_close(out.hidden_states[-1], model.transformer(ids).last_hidden_state)


@torch.no_grad()
def test_positions_follow_the_attention_mask_for_left_padding(model):
    ids = torch.randint(0, 256, (1, 8))
    padded = torch.cat([torch.full((1, 3), 256), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], model(ids).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_logits_to_keep_returns_the_last_positions(model):
    ids = torch.randint(0, 256, (2, 10))
    full = model(ids).logits
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:])


def test_loss_matches_shifted_cross_entropy_and_num_items_in_batch(model):
    ids = torch.randint(0, 256, (2, 12))
    labels = ids.clone()
    labels[0, 5:] = -100
    out = model(ids, labels=labels)
    reference = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 257), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, reference)
    n_targets = int((labels[:, 1:] != -100).sum())
    summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(n_targets)).loss
    torch.testing.assert_close(summed, reference)
    halved = model(ids, labels=labels, num_items_in_batch=torch.tensor(2 * n_targets)).loss
    torch.testing.assert_close(halved, reference / 2)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_gradient_checkpointing_gives_the_same_gradients(architecture):
    ids = torch.randint(0, 256, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(n_layer=3, **ARCHITECTURES[architecture]).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.transformer.h[0].gradient_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0, msg=name)


def test_dropout_is_active_in_train_mode_only():
    model = tiny_model(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.allclose(model(ids).logits, model(ids).logits)


def test_resize_token_embeddings_keeps_the_tie(gpt2_model):
    model = gpt2_model
    model.resize_token_embeddings(300)
    assert model.config.vocab_size == 300
    assert model.lm_head.weight.shape == (300, 64)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model(torch.tensor([[299, 1]])).logits.shape == (1, 2, 300)


def test_sequence_classification_head_runs(model):
    config = tiny_config(num_labels=3)
    config.pad_token_id = 256
    head = AutoModelForSequenceClassification.from_config(config)
    out = head(torch.tensor([[5, 6, 7, 256], [1, 2, 3, 4]]), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.isfinite()


@pytest.mark.slow
def test_compiles_without_graph_breaks(model):
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        eager_logits = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(ids).logits, eager_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head_class", [glade.GladeForSequenceClassification, glade.GladeForTokenClassification,
                                        glade.GladeForQuestionAnswering])
def test_every_head_reads_writes_and_resizes_the_base_models_token_embedding(head_class):
    head = head_class(tiny_config(num_labels=2))
    assert head.get_input_embeddings() is head.transformer.wte
    replacement = torch.nn.Embedding(257, 64)
    head.set_input_embeddings(replacement)
    assert head.transformer.wte is replacement
    head.resize_token_embeddings(300)
    assert head.transformer.wte.num_embeddings == 300 and head.config.vocab_size == 300


class TestBadInput:
    def test_out_of_vocab_id_is_named(self, model):
        with pytest.raises(ValueError, match=r"token id 257, outside the vocabulary \[0, 256\] \(vocab_size=257\)"):
            model(torch.tensor([[1, 257, 3]]))

    def test_negative_id_is_named(self, model):
        with pytest.raises(ValueError, match=r"token id -1, outside the vocabulary"):
            model(torch.tensor([[1, -1, 3]]))

    def test_too_long_sequence_gives_both_numbers(self):
        with pytest.raises(ValueError, match=r"Sequence length 129 .*n_positions=128"):
            tiny_model()(torch.zeros(1, 129, dtype=torch.long))

    def test_too_long_with_cache(self):
        model = tiny_model()
        out = model(torch.zeros(1, 100, dtype=torch.long), use_cache=True)
        with pytest.raises(ValueError, match=r"Sequence length 130 \(cache \+ input\) exceeds .*n_positions=128"):
            model(torch.zeros(1, 30, dtype=torch.long), cache=out.cache)

    def test_neither_ids_nor_embeds(self, model):
        with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
            model()

    def test_both_ids_and_embeds(self, model):
        ids = torch.zeros(1, 3, dtype=torch.long)
        with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
            model(ids, inputs_embeds=model.transformer.wte(ids))


@torch.no_grad()
def test_inputs_embeds_equal_input_ids(model):
    ids = torch.randint(0, 256, (2, 6))
    torch.testing.assert_close(model(inputs_embeds=model.transformer.wte(ids)).logits, model(ids).logits)
