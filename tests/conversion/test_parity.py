"""The parity report: what it measures, where it is written, and that it points at the block that drifts."""

import copy
import dataclasses
import json
import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from glade.cli import main
from glade.conversion import FAMILIES, compare_models, convert_gpt2, parity_batch, write_parity_report
from glade.conversion.cli import PARITY_FAILED_EXIT_CODE
from glade.conversion.state_dict import glade_to_gpt2
from glade.tiny import tiny_model


@pytest.mark.slow
def test_identical_models_report_zero_difference():
    model = tiny_model(n_layer=3)
    report = compare_models(model, copy.deepcopy(model), parity_batch(257, 128))
    assert list(report.hidden_states_max_abs_diff) == ["embeddings", "block 0", "block 1", "block 2 + ln_f"]
    assert set(report.hidden_states_max_abs_diff.values()) == {0.0}
    assert (report.logits_max_abs_diff, report.kl_divergence, report.top1_agreement) == (0.0, 0.0, 1.0)
    assert report.greedy_identical and len(report.greedy_source) == 16 and report.passed


@pytest.mark.slow
def test_a_perturbed_block_is_named_and_the_metrics_match_a_direct_computation():
    source = tiny_model(n_layer=3)
    drifted = copy.deepcopy(source)
    with torch.no_grad():
        drifted.transformer.h[1].mlp.c_fc.bias += 0.5
    input_ids = parity_batch(257, 128)
    report = compare_models(source, drifted, input_ids)

    assert report.first_drifting_block == "block 1"
    assert report.hidden_states_max_abs_diff["block 0"] == 0.0
    assert report.hidden_states_max_abs_diff["block 1"] > 1e-3
    assert not report.passed
    with torch.no_grad():
        expected, actual = source(input_ids).logits.double(), drifted(input_ids).logits.double()
    assert report.logits_max_abs_diff == (expected - actual).abs().max().item()
    kl = kl_divergence(Categorical(logits=expected), Categorical(logits=actual)).mean().item()
    assert abs(report.kl_divergence - kl) <= 1e-12 and report.kl_divergence > 0
    assert report.top1_agreement == (expected.argmax(-1) == actual.argmax(-1)).double().mean().item()


def nan_model():
    model = tiny_model()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(math.nan)
    return model


@pytest.mark.slow
def test_nan_fails_the_check_even_where_both_models_agree():
    source = nan_model()
    report = compare_models(source, copy.deepcopy(source), parity_batch(257, 128))
    assert report.hidden_states_max_abs_diff["embeddings"] == 0.0
    assert math.isnan(report.hidden_states_max_abs_diff["block 0"]) and math.isnan(report.logits_max_abs_diff)
    assert report.first_drifting_block == "block 0"
    assert not report.logits_within_tolerance and not report.passed
    assert report.format().endswith("\nFAIL")


@pytest.mark.slow
def test_an_export_that_drifts_prints_fail_and_exits_non_zero(tmp_path, capsys, monkeypatch):
    tiny_model().save_pretrained(tmp_path / "glade")

    def drifting(state_dict, config):  # a conversion bug: block 0's MLP weights come out scaled
        converted = glade_to_gpt2(state_dict, config)
        converted["transformer.h.0.mlp.c_fc.weight"] = converted["transformer.h.0.mlp.c_fc.weight"] * 1.5
        return converted

    monkeypatch.setitem(FAMILIES, "gpt2", dataclasses.replace(FAMILIES["gpt2"], stock_tensors=drifting))
    code = main(["export", "gpt2", str(tmp_path / "glade"), str(tmp_path / "gpt2"), "--check"])
    out = capsys.readouterr().out
    assert code == PARITY_FAILED_EXIT_CODE
    assert "first block that drifts: block 0" in out and "\nFAIL\n" in out and "PASS" not in out


def test_an_export_of_nan_weights_is_refused_before_any_check(tmp_path, capsys):
    nan_model().save_pretrained(tmp_path / "glade")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "gpt2", str(tmp_path / "glade"), str(tmp_path / "gpt2"), "--check"])
    assert exit_info.value.code == 2
    assert "holds NaN or infinite weights in transformer.h.0.mlp.c_fc.weight" in capsys.readouterr().err
    assert not (tmp_path / "gpt2").exists()


@pytest.mark.slow
def test_check_writes_the_report_beside_the_weights_and_into_the_model_card(tmp_path, gpt2_dir, capsys):
    conversion = convert_gpt2(gpt2_dir, tmp_path / "glade", check=True)
    report = conversion.parity
    assert report.passed, report.format()
    saved = json.loads((tmp_path / "glade" / "parity_report.json").read_text())
    assert saved["passed"] is True and saved["greedy_identical"] is True
    assert saved["source"] == str(gpt2_dir) and saved["converted"] == str(tmp_path / "glade")
    assert saved["logits_max_abs_diff"] == report.logits_max_abs_diff <= 1e-5
    assert saved["first_drifting_block"] is None and saved["top1_agreement"] == 1.0
    assert len(saved["hidden_states_max_abs_diff"]) == 3
    card = (tmp_path / "glade" / "README.md").read_text()
    assert "## Conversion parity" in card and "- first block that drifts: none" in card and "PASS" in card


def test_writing_the_report_leaves_the_card_to_the_card_writer(tmp_path):
    # One writer renders every README.md (glade.training.model_card); the report is a section it renders.
    model = tiny_model()
    report = compare_models(model, model, parity_batch(257, 128))
    (tmp_path / "README.md").write_text("# My model\n\nTrained on things.\n")
    write_parity_report(report, tmp_path)
    assert (tmp_path / "README.md").read_text() == "# My model\n\nTrained on things.\n"
    assert json.loads((tmp_path / "parity_report.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    assert report.to_markdown().startswith("## Conversion parity\n")


def test_parity_batch_uses_the_tokenizer_when_its_ids_fit(tokenizer):
    from glade.conversion.parity import SAMPLE_TEXT

    batch = parity_batch(257, 128, tokenizer, length=20)
    assert batch.tolist() == [tokenizer(SAMPLE_TEXT)["input_ids"][:20]]
    random_batch = parity_batch(100, 16)
    assert random_batch.shape == (2, 16) and int(random_batch.max()) < 100
    assert torch.equal(random_batch, parity_batch(100, 16))
