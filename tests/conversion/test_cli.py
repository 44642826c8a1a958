"""`glade convert gpt2|nanogpt` and `glade export gpt2` end to end through the command line entry point."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from glade import GladeForCausalLM
from glade.cli import main


@pytest.mark.slow
def test_convert_gpt2_with_check_then_export(tmp_path, gpt2_dir, capsys):
    assert main(["convert", "gpt2", str(gpt2_dir), str(tmp_path / "glade"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "first block that drifts: none" in out and "greedy continuation (16 tokens): identical" in out
    assert out.rstrip().endswith(f"Wrote {tmp_path / 'glade'}")
    assert json.loads((tmp_path / "glade" / "parity_report.json").read_text())["passed"] is True

    assert main(["export", "gpt2", str(tmp_path / "glade"), str(tmp_path / "back")]) == 0
    original, exported = load_file(gpt2_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert all(torch.equal(exported[key], tensor) for key, tensor in original.items())
    assert not (tmp_path / "back" / "parity_report.json").exists()


@pytest.mark.slow
def test_convert_nanogpt_with_tokenizer_and_crop(tmp_path, nanogpt, nanogpt_reference, gpt2_tokenizer_dir, capsys):
    path, state_dict, model_args = nanogpt(tmp_path / "ckpt.pt", vocab_size=50304, n_embd=32)
    argv = ["convert", "nanogpt", str(path), str(tmp_path / "glade"), "--tokenizer", str(gpt2_tokenizer_dir),
            "--crop-vocab", "50257"]
    assert main(argv) == 0
    assert f"Wrote {tmp_path / 'glade'}" in capsys.readouterr().out
    glade = GladeForCausalLM.from_pretrained(tmp_path / "glade").eval()
    assert (glade.config.vocab_size, glade.config.eos_token_id, glade.config.bos_token_id) == (50257, 50256, 50256)
    assert glade.generation_config.eos_token_id == 50256
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "glade")
    input_ids = tokenizer("Hello world, once upon a time", return_tensors="pt")["input_ids"]
    assert input_ids[0, :2].tolist() == [15496, 995]
    with torch.no_grad():
        expected = nanogpt_reference(state_dict, model_args["n_head"], input_ids)[..., :50257]
        assert (glade(input_ids).logits - expected).abs().max() <= 1e-5


def test_errors_exit_with_code_2_and_a_message(tmp_path, gpt2_dir, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "gpt2", str(gpt2_dir), str(tmp_path / "taken")])
    assert exit_info.value.code == 2
    assert "glade convert: error: Destination" in capsys.readouterr().err
    assert main(["convert", "gpt2", str(gpt2_dir), str(tmp_path / "taken"), "--overwrite"]) == 0


@pytest.mark.slow
def test_a_failed_check_exits_with_code_1(tmp_path, gpt2_dir, monkeypatch, capsys):
    # A conversion that is off by a little in one block: the report must fail it and the exit code must say so.
    from glade.conversion import gpt2 as gpt2_module

    load = gpt2_module.load_gpt2_as_glade

    def load_with_a_drifting_block(directory):
        model = load(directory)
        with torch.no_grad():
            model.transformer.h[1].ln_2.bias += 0.01
        return model

    monkeypatch.setattr(gpt2_module, "load_gpt2_as_glade", load_with_a_drifting_block)
    assert main(["convert", "gpt2", str(gpt2_dir), str(tmp_path / "glade"), "--check"]) == 1
    out = capsys.readouterr().out
    assert "first block that drifts: block 1 + ln_f" in out and out.splitlines()[-2] == "FAIL"
    assert json.loads((tmp_path / "glade" / "parity_report.json").read_text())["passed"] is False
