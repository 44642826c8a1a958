"""What serving engines read from a transformers model: vLLM's transformers backend takes the attention interface
(its own attention registered by name), `_supports_attention_backend`, `base_model_tp_plan` (test_config.py checks
it names only modules the config builds), an output head named `lm_head` with customisation only in the base model,
and soft-capping as `final_logit_softcapping`. Hub kernels (transformers 5.25 loads with `use_kernels=True` by
default) replace named layers and must change no output."""

import json

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.hub_kernels import is_kernels_available
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import glade
from architectures import ARCHITECTURES
from glade import GladeConfig
from glade.tiny import tiny_model

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def test_soft_capping_is_read_and_written_as_final_logit_softcapping(tmp_path):
    config = GladeConfig(final_logit_softcapping=15.0)
    assert config.logit_softcap == config.final_logit_softcapping == 15.0
    config.final_logit_softcapping = 30.0
    assert config.logit_softcap == 30.0
    assert GladeConfig().final_logit_softcapping is None
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["final_logit_softcapping"] = saved.pop("logit_softcap")  # a config written under the other name
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert GladeConfig.from_pretrained(tmp_path).logit_softcap == 30.0


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@torch.no_grad()
def test_logits_are_the_head_of_the_base_model_capped_as_the_config_names_it(architecture):
    """vLLM runs the base model, then applies `lm_head` and `final_logit_softcapping` itself."""
    model = tiny_model(**{**ARCHITECTURES[architecture], "logit_softcap": 30.0})
    assert isinstance(model.lm_head, torch.nn.Linear) and model.get_output_embeddings() is model.lm_head
    hidden = model.base_model(IDS).last_hidden_state
    cap = model.config.final_logit_softcapping
    assert torch.equal(model(IDS).logits, cap * torch.tanh(model.lm_head(hidden) / cap))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@torch.no_grad()
def test_an_attention_registered_by_name_runs_every_layer_and_gets_the_forward_kwargs(architecture):
    calls = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, module.is_causal, kwargs.get("serving_metadata")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("glade_test_probe", probe)
    model = tiny_model(**ARCHITECTURES[architecture])
    expected = model(IDS).logits
    assert glade.GladePreTrainedModel._supports_attention_backend
    model.set_attn_implementation("glade_test_probe")
    torch.testing.assert_close(model(IDS, serving_metadata="batch-7").logits, expected, atol=1e-6, rtol=1e-6)
    assert calls == [(layer, True, "batch-7") for layer in range(model.config.n_layer)]


@pytest.mark.skipif(not is_kernels_available(), reason="no kernels package of a version this transformers supports")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_hub_kernels_on_and_off_compute_the_same(tmp_path, architecture):
    tiny_model(**ARCHITECTURES[architecture]).save_pretrained(tmp_path)
    with_kernels = AutoModelForCausalLM.from_pretrained(tmp_path, use_kernels=True)
    without = AutoModelForCausalLM.from_pretrained(tmp_path, use_kernels=False)
    assert with_kernels.use_kernels and not without.use_kernels
    with torch.no_grad():
        assert torch.equal(with_kernels.eval()(IDS).logits, without.eval()(IDS).logits)
    losses = []
    for model in (with_kernels.train(), without.train()):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        losses.append((loss, model.lm_head.weight.grad))
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])


@pytest.mark.skipif(not is_kernels_available(), reason="the kernels package is not installed")
def test_the_layers_with_hub_kernels_carry_their_names():
    model = tiny_model(**ARCHITECTURES["modern"])
    block = model.transformer.h[0]
    assert type(block.ln_1).kernel_layer_name == "RMSNorm"
    assert type(block.mlp.gate_act).kernel_layer_name == "SiLU"
    assert glade.modeling_glade.apply_rotary_pos_emb.kernel_layer_name == "rotary_pos_emb"
