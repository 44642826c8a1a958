"""Glade -> stock GPT-2, and the full round trip GPT-2 -> Glade -> GPT-2."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from glade.conversion import convert_gpt2, export_gpt2
from glade.tiny import byte_level_tokenizer, tiny_model
from subprocess_helpers import last_json_line, run_without_glade

# The python of an environment with transformers 4.57 (docs/exporting.md says how to make one).
TRANSFORMERS4_PYTHON = os.environ.get("GLADE_TRANSFORMERS4_PYTHON", "")
TEXTS = ["Hello world", "  two spaces, tabs\tand\nnewlines", "caf\u00e9 \u2014 \u65e5\u672c", "end<|endoftext|>next"]


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_glade_with_exact_gelu_and_custom_width_exports(tmp_path):
    model = tiny_model(activation_function="gelu", n_inner=96)
    model.save_pretrained(tmp_path / "glade")
    conversion = export_gpt2(tmp_path / "glade", tmp_path / "gpt2", check=True)
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    assert (config["activation_function"], config["n_inner"]) == ("gelu", 96)
    assert conversion.parity.passed, conversion.parity.format()
    assert conversion.parity.logits_max_abs_diff <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer_files", ["glade", "gpt2"])
def test_exported_folder_serves_tools_older_than_transformers_5(tmp_path, make_glade, tokenizer_files):
    if tokenizer_files == "glade":  # saved by transformers 5: tokenizer_class is TokenizersBackend
        source = tmp_path / "glade"
        tiny_model().save_pretrained(source)
        byte_level_tokenizer().save_pretrained(source)
    else:  # GPT-2's own files: tokenizer_class is GPT2Tokenizer
        source = make_glade()
    export_gpt2(source, tmp_path / "gpt2")

    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == json.loads((source / "config.json").read_text())["n_positions"]
    source_fields = json.loads((source / "tokenizer_config.json").read_text())
    exported_fields = json.loads((tmp_path / "gpt2" / "tokenizer_config.json").read_text())
    assert exported_fields == {
        **source_fields,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_input_names": ["input_ids", "attention_mask"],
    }
    source_tokenizer = AutoTokenizer.from_pretrained(source)
    exported = AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    assert exported(TEXTS).data == source_tokenizer(TEXTS).data
    assert exported.all_special_tokens == source_tokenizer.all_special_tokens
    assert exported.model_max_length == source_tokenizer.model_max_length


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(TRANSFORMERS4_PYTHON).is_file(),
    reason="GLADE_TRANSFORMERS4_PYTHON does not name the python of a transformers 4.57 environment",
)
def test_exported_model_generates_the_same_tokens_in_transformers_4(tmp_path, make_glade):
    source = make_glade()
    export_gpt2(source, tmp_path / "gpt2")
    prompts = ["It was a dark and stormy night", '"Who is there?" cried Mr. Lorry,']
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    greedy = dict(max_new_tokens=20, do_sample=False)
    expected = [model.generate(**tokenizer(prompt, return_tensors="pt"), **greedy)[0].tolist() for prompt in prompts]
    stdout = run_without_glade(
        f"""
        import json, transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / "gpt2")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "gpt2")!r})
        ids = [
            model.generate(**tokenizer(prompt, return_tensors="pt"), **{greedy!r})[0].tolist() for prompt in {prompts!r}
        ]
        print(json.dumps({{"version": transformers.__version__, "model": type(model).__name__, "ids": ids}}))
        """,
        cwd=str(tmp_path),
        python=TRANSFORMERS4_PYTHON,
    )
    result = last_json_line(stdout)
    assert result["version"].startswith("4.") and result["model"] == "GPT2LMHeadModel"
    assert result["ids"] == expected
