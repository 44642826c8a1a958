"""Glade -> stock GPT-2, and the full round trip GPT-2 -> Glade -> GPT-2."""

import json

import pytest
import torch
from safetensors.torch import load_file

from glade.conversion import convert_gpt2, export_gpt2
from glade.tiny import tiny_model
from subprocess_helpers import last_json_line, run_without_glade


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_bitwise(tmp_path, make_gpt2, tied):
    make_gpt2(tie_word_embeddings=tied).save_pretrained(tmp_path / "gpt2")
    convert_gpt2(tmp_path / "gpt2", tmp_path / "glade")
    export_gpt2(tmp_path / "glade", tmp_path / "back")
    original = load_file(tmp_path / "gpt2" / "model.safetensors")
    exported = load_file(tmp_path / "back" / "model.safetensors")
    assert exported.keys() == original.keys()
    assert ("lm_head.weight" in exported) == (not tied)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert "auto_map" not in config and not list((tmp_path / "back").glob("*.py"))
    assert config["tie_word_embeddings"] is tied


def test_exported_checkpoint_loads_with_plain_transformers(tmp_path, gpt2_dir, gpt2_model):
    convert_gpt2(gpt2_dir, tmp_path / "glade")
    export_gpt2(tmp_path / "glade", tmp_path / "back")
    ids = [[5, 17, 42, 99, 3, 200, 7, 1]]
    with torch.no_grad():
        expected = gpt2_model(torch.tensor(ids)).logits
    stdout = run_without_glade(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "back")!r})
        with torch.no_grad():
            logits = model(torch.tensor({ids})).logits
        print(json.dumps({{"class": type(model).__name__, "logits": logits.tolist()}}))
        """,
        cwd=str(tmp_path),
    )
    result = last_json_line(stdout)
    assert result["class"] == "GPT2LMHeadModel"
    assert torch.equal(torch.tensor(result["logits"]), expected)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "back").iterdir()}
    assert set(modes.values()) == {0o644}, modes  # the weights too: readable by everyone, like every other file


def test_glade_with_exact_gelu_and_custom_width_exports(tmp_path):
    model = tiny_model(activation_function="gelu", n_inner=96)
    model.save_pretrained(tmp_path / "glade")
    conversion = export_gpt2(tmp_path / "glade", tmp_path / "gpt2", check=True)
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    assert (config["activation_function"], config["n_inner"]) == ("gelu", 96)
    assert conversion.parity.passed, conversion.parity.format()
    assert conversion.parity.logits_max_abs_diff <= 1e-5
