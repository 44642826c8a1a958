import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import glade
from glade.tiny import tiny_model
from subprocess_helpers import last_json_line, run_without_glade


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_keeps_every_parameter_and_the_tie(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, glade.GladeForCausalLM)
    original = dict(model.named_parameters(remove_duplicate=False))
    for name, param in loaded.named_parameters(remove_duplicate=False):
        assert torch.equal(param, original[name]), name
    shares = loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert shares == tied
    stored = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not tied)


def test_saved_files_carry_auto_map_and_generation_config(tmp_path, model):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "glade"
    assert config["architectures"] == ["GladeForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_glade.GladeConfig",
        "AutoModel": "modeling_glade.GladeModel",
        "AutoModelForCausalLM": "modeling_glade.GladeForCausalLM",
    }
    for remote_code in glade.REMOTE_CODE_FILES:
        assert (tmp_path / remote_code).is_file(), remote_code
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 256


def test_base_model_loads_from_a_causal_lm_checkpoint(tmp_path, model):
    model.save_pretrained(tmp_path)
    base = glade.GladeModel.from_pretrained(tmp_path)
    torch.testing.assert_close(base.wte.weight, model.transformer.wte.weight)


@pytest.mark.slow
def test_remote_code_route_without_glade(tmp_path, model):
    model.save_pretrained(tmp_path)
    ids = [[5, 17, 42, 99, 3, 200]]
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits
    stdout = run_without_glade(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoModel
        try:
            import glade
            raise SystemExit("glade should not be importable here")
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        base = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(model).__name__ == "GladeForCausalLM" and type(base).__name__ == "GladeModel"
        assert not type(model).__module__.startswith("glade")
        with torch.no_grad():
            print(json.dumps(model(torch.tensor({ids})).logits.tolist()))
        """,
        cwd=str(tmp_path),
    )
    logits = torch.tensor(last_json_line(stdout))
    assert (logits - expected).abs().max().item() == 0.0


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="does-not-exist"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "does-not-exist")


def test_truncated_weights_file_names_the_checkpoint(tmp_path, model):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=r"corrupt or truncated safetensors file"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_old_mask_buffers_are_ignored_but_real_biases_are_reported(tmp_path, gpt2_model):
    model = gpt2_model
    from safetensors.torch import save_file

    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    model.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, info = glade.GladeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    _, info = glade.GladeForCausalLM.from_pretrained(tmp_path, bias=False, output_loading_info=True)
    assert "transformer.h.0.attn.c_attn.bias" in info["unexpected_keys"]
    assert "transformer.h.0.attn.bias" not in info["unexpected_keys"]
