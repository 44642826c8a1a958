"""Glade -> the stock transformers class its config picks: GPT-NeoX, Llama, Qwen3, NanoChat (and GPT-2, as
`export gpt2`)."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, NanoChatForCausalLM

from export_helpers import saved_random_glade
from glade import GladeConfig
from glade.configuration_glade import PRESETS
from glade.cli import main
from glade.conversion import export_gpt2, export_stock, glade_to_nanochat, stock_config_from_glade
from glade.conversion.state_dict import model_from_state_dict
from glade.tiny import tiny_model

ROTARY = dict(positions="rotary", rope_parameters={"rope_type": "default", "rope_theta": 500.0})
LLAMA = dict(ROTARY, norm="rmsnorm", activation_function="swiglu", bias=False, n_kv_head=2)
# The nanochat preset's options, with grouped-query attention.
NANOCHAT = {
    **{name: value for name, value in PRESETS["nanochat"].items() if name not in ("n_layer", "n_head", "n_embd",
                                                                                  "n_positions", "vocab_size")},
    **ROTARY, "n_kv_head": 2,
}
TARGETS = {
    # GPT-2 + rotary: the architecture of glade-small-modern.
    "gpt_neox": ("GPTNeoXForCausalLM", ROTARY),
    "gpt_neox-exact-gelu-untied": ("GPTNeoXForCausalLM", dict(ROTARY, activation_function="gelu",
                                                              tie_word_embeddings=False)),
    "gpt_neox-relu2": ("GPTNeoXForCausalLM", dict(ROTARY, activation_function="relu2")),
    "llama": ("LlamaForCausalLM", dict(LLAMA, tie_word_embeddings=False)),
    "llama-biases-tied": ("LlamaForCausalLM", dict(LLAMA, bias=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(LLAMA, qk_norm=True, tie_word_embeddings=False)),
    "gpt_neox-partial-yarn": ("GPTNeoXForCausalLM", dict(ROTARY, rope_parameters={
        "rope_type": "yarn", "factor": 2.0, "rope_theta": 500.0, "partial_rotary_factor": 0.5})),
    "llama-linear": ("LlamaForCausalLM", dict(LLAMA, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
    "nanochat": ("NanoChatForCausalLM", NANOCHAT),
}
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[1, :3] = 0  # left padding


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_export_computes_what_glade_computes(tmp_path, target):
    class_name, options = TARGETS[target]
    glade = saved_random_glade(tmp_path / "glade", **options)
    conversion = export_stock(tmp_path / "glade", tmp_path / "stock", check=True)
    assert conversion.parity.passed, conversion.parity.format()
    assert "tokenizer.json" in conversion.tokenizer_files

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    assert type(stock).__name__ == class_name
    assert not list((tmp_path / "stock").glob("*.py"))
    with torch.no_grad():
        assert torch.equal(stock(IDS).logits, glade(IDS).logits)
        # Left padding: Glade derives positions from the mask, the stock classes take them as generate() does.
        positions = (MASK.cumsum(-1) - 1).clamp(min=0)
        expected = glade(IDS, attention_mask=MASK).logits
        actual = stock(IDS, attention_mask=MASK, position_ids=positions).logits
        assert torch.equal(actual[MASK.bool()], expected[MASK.bool()])
    greedy = dict(attention_mask=MASK, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(stock.generate(IDS, **greedy), glade.generate(IDS, **greedy))


@pytest.mark.parametrize("target", TARGETS)
def test_saved_config_reads_back_as_the_glade_config(tmp_path, target):
    class_name, options = TARGETS[target]
    glade = tiny_model(**options).config
    stock_config_from_glade(glade).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config).__name__ == class_name.replace("ForCausalLM", "Config")
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    assert {name: getattr(config, name) for name in fields} == {name: getattr(glade, name) for name in fields}
    if config.model_type == "gpt_neox":
        assert (config.use_parallel_residual, config.layer_norm_eps) == (False, glade.layer_norm_epsilon)
    else:
        assert (config.num_key_value_heads, config.rms_norm_eps) == (glade.n_kv_head, glade.layer_norm_epsilon)
    assert config.rope_parameters == glade.rope_parameters  # the scaling and the rotating share with it
    assert getattr(config, "final_logit_softcapping", None) == glade.logit_softcap
    # The older names of the rotary settings, for transformers 4 and llama.cpp's converter.
    saved = json.loads((tmp_path / "config.json").read_text())
    if config.model_type == "gpt_neox":
        rotating = glade.rope_parameters["partial_rotary_factor"]
        assert (saved["rotary_pct"], saved["rotary_emb_base"]) == (rotating, 500.0)
    else:
        assert saved["rope_theta"] == 500.0


@pytest.mark.parametrize("options,message", [
    (dict(LLAMA, activation_function="relu2"), "activation_function='relu2', which LlamaForCausalLM"),
    (dict(LLAMA, logit_softcap=30.0), "logit_softcap=30.0, which LlamaForCausalLM"),
    (dict(LLAMA, qk_norm=True, bias=True), "bias=True, which Qwen3ForCausalLM"),
    (dict(ROTARY, qk_norm=True), "qk_norm=True, which GPTNeoXForCausalLM"),
    (dict(ROTARY, n_kv_head=2), "n_kv_head=2, which GPTNeoXForCausalLM"),
    (dict(ROTARY, bias=False, activation_function="swiglu"),
     "activation_function='swiglu', bias=False, which GPTNeoXForCausalLM"),
    ({"norm": "rmsnorm"}, "norm='rmsnorm', which GPT-2"),
    (dict(LLAMA, rope_parameters={"partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5, which LlamaForCausalLM"),
    (dict(NANOCHAT, bias=True, tie_word_embeddings=True),
     "bias=True, tie_word_embeddings=True, which NanoChatForCausalLM"),
    (dict(NANOCHAT, activation_function="swiglu"), "activation_function='swiglu', which NanoChatForCausalLM"),
    (dict(NANOCHAT, rope_parameters={"partial_rotary_factor": 0.5}),
     "partial_rotary_factor=0.5, which NanoChatForCausalLM"),
    (dict(LLAMA, norm_gain=False), "norm_gain=False, which LlamaForCausalLM"),
    (dict(ROTARY, embedding_norm=True), "embedding_norm=True, which GPTNeoXForCausalLM"),
    ({"norm_gain": False}, "norm_gain=False, which GPT-2"),
    (dict(LLAMA, residual_lambdas=True), "residual_lambdas=True, which LlamaForCausalLM"),
    (dict(NANOCHAT, residual_lambdas=True, value_embeddings=True),
     "residual_lambdas=True, value_embeddings=True, which NanoChatForCausalLM"),
    ({"value_embeddings": True}, "value_embeddings=True, which GPT-2"),
])
def test_a_config_no_stock_class_expresses_is_refused_by_name(options, message):
    with pytest.raises(ValueError, match=f"Glade config uses {message} cannot express"):
        stock_config_from_glade(GladeConfig(n_embd=64, n_head=4, **options))


@torch.no_grad()
def test_the_nanochat_preset_computes_nanochats_logits_bit_for_bit():
    glade = tiny_model(**NANOCHAT)
    stock = model_from_state_dict(NanoChatForCausalLM, stock_config_from_glade(glade.config),
                                  glade_to_nanochat(glade.state_dict(), glade.config)).eval()
    for attn_implementation in ("eager", "sdpa"):
        for model in (glade, stock):
            model.set_attn_implementation(attn_implementation)
        assert torch.equal(stock(IDS).logits, glade(IDS).logits)
    assert stock.config.final_logit_softcapping == 15.0 and not stock.config.tie_word_embeddings
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=256)
    assert torch.equal(stock.generate(IDS, **greedy), glade.generate(IDS, **greedy))


def test_a_refused_export_writes_nothing(tmp_path):
    saved_random_glade(tmp_path / "glade", **dict(LLAMA, logit_softcap=30.0))
    with pytest.raises(ValueError, match="logit_softcap=30.0"):
        export_stock(tmp_path / "glade", tmp_path / "stock")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["glade"]


def test_a_gpt2_shaped_config_exports_exactly_as_export_gpt2(tmp_path):
    saved_random_glade(tmp_path / "glade")
    export_gpt2(tmp_path / "glade", tmp_path / "gpt2")
    export_stock(tmp_path / "glade", tmp_path / "stock")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (tmp_path / "stock" / name).read_text() == (tmp_path / "gpt2" / name).read_text(), name
    expected = load_file(tmp_path / "gpt2" / "model.safetensors")
    exported = load_file(tmp_path / "stock" / "model.safetensors")
    assert exported.keys() == expected.keys() and all(torch.equal(exported[key], expected[key]) for key in expected)


@pytest.mark.slow
def test_cli_exports_with_a_parity_report_and_names_a_refused_option(tmp_path, capsys):
    saved_random_glade(tmp_path / "glade", **LLAMA)
    assert main(["export", "stock", str(tmp_path / "glade"), str(tmp_path / "llama"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "first block that drifts: none" in out and out.rstrip().endswith(f"Wrote {tmp_path / 'llama'}")
    assert json.loads((tmp_path / "llama" / "parity_report.json").read_text())["passed"] is True

    saved_random_glade(tmp_path / "capped", **dict(LLAMA, logit_softcap=30.0))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "stock", str(tmp_path / "capped"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "glade export: error: Glade config uses logit_softcap=30.0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("command,options", [("gpt2", {}), ("stock", ROTARY)])
def test_check_of_a_checkpoint_that_samples_logs_no_generation_warning(tmp_path, caplog, command, options):
    # The shipped model's settings: greedy parity decoding used to inherit them and have transformers warn.
    saved_random_glade(tmp_path / "glade", **options)
    GenerationConfig(do_sample=True, temperature=0.6, top_k=40, eos_token_id=256).save_pretrained(tmp_path / "glade")
    transformers_logger = logging.getLogger("transformers")  # it does not propagate to caplog's root handler
    transformers_logger.addHandler(caplog.handler)
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process record of warnings already given
    try:
        assert main(["export", command, str(tmp_path / "glade"), str(tmp_path / "out"), "--check"]) == 0
    finally:
        transformers_logger.removeHandler(caplog.handler)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
