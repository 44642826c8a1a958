"""Bad inputs fail with a message naming the problem, and leave nothing behind."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_helpers import rewrite_weights
from glade.atomic import atomic_directory
from glade.cli import main
from glade.conversion import convert_gpt2, convert_nanogpt, export_gpt2


def assert_fails_cleanly(convert, destination, error_type, match):
    with pytest.raises(error_type, match=match):
        convert()
    assert not destination.exists()
    assert sorted(p.name for p in destination.parent.iterdir() if p.name.startswith(".")) == []


def test_missing_weights_file(tmp_path, gpt2_dir):
    (gpt2_dir / "model.safetensors").unlink()
    destination = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_gpt2(gpt2_dir, destination), destination, FileNotFoundError, "No weights in .*model.safetensors"
    )


def test_missing_source_directory(tmp_path):
    destination = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_gpt2(tmp_path / "nowhere", destination), destination, FileNotFoundError,
        "model directory .*nowhere does not exist",
    )


def test_non_gpt2_config(tmp_path, gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    config["model_type"] = "llama"
    (gpt2_dir / "config.json").write_text(json.dumps(config))
    destination = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_gpt2(gpt2_dir, destination), destination, ValueError,
        "is not a gpt2 config \\(model_type='llama', expected 'gpt2'\\)",
    )


def test_corrupted_tensor_shape(tmp_path, gpt2_dir):
    weights = load_file(gpt2_dir / "model.safetensors")
    weights["transformer.h.1.mlp.c_proj.weight"] = weights["transformer.h.1.mlp.c_proj.weight"][:, :-1].contiguous()
    save_file(weights, gpt2_dir / "model.safetensors", metadata={"format": "pt"})
    destination = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_gpt2(gpt2_dir, destination), destination, ValueError,
        r"transformer.h.1.mlp.c_proj.weight has shape \[63, 256\].*needs \[64, 256\]",
    )


def test_unsupported_gpt2_flag(tmp_path, gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    config["scale_attn_by_inverse_layer_idx"] = True
    (gpt2_dir / "config.json").write_text(json.dumps(config))
    destination = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_gpt2(gpt2_dir, destination), destination, ValueError, "scale_attn_by_inverse_layer_idx=True"
    )


def test_truncated_safetensors(tmp_path, gpt2_dir):
    weights = gpt2_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    destination = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_gpt2(gpt2_dir, destination), destination, ValueError,
        "model.safetensors is not a readable safetensors file",
    )


def test_truncated_nanogpt_checkpoint(tmp_path, nanogpt):
    path, _, _ = nanogpt(tmp_path / "ckpt.pt")
    path.write_bytes(path.read_bytes()[:1000])
    destination = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_nanogpt(path, destination), destination, ValueError,
        "ckpt.pt is not a readable PyTorch checkpoint",
    )


def test_nanogpt_checkpoint_without_model_args(tmp_path, nanogpt):
    path, _, _ = nanogpt(tmp_path / "ckpt.pt")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["model_args"]
    torch.save(checkpoint, path)
    destination = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_nanogpt(path, destination), destination, ValueError,
        "is not a nanoGPT checkpoint: it needs 'model' and 'model_args'",
    )


def test_export_refuses_bias_free_glade(tmp_path):
    from glade.tiny import tiny_model

    tiny_model(bias=False).save_pretrained(tmp_path / "glade")
    destination = tmp_path / "out"
    assert_fails_cleanly(
        lambda: export_gpt2(tmp_path / "glade", destination), destination, ValueError,
        "bias=False, which GPT-2 cannot express",
    )


@pytest.mark.parametrize("option,message", [
    ({"positions": "rotary"}, "positions='rotary'"),
    ({"norm": "rmsnorm"}, "norm='rmsnorm'"),
    ({"qk_norm": True}, "qk_norm=True"),
    ({"activation_function": "relu2"}, "activation_function='relu2'"),
    ({"activation_function": "swiglu"}, "activation_function='swiglu'"),
    ({"n_kv_head": 2}, "n_kv_head=2"),
    ({"logit_softcap": 30.0}, "logit_softcap=30.0"),
])
def test_export_refuses_each_modern_option_by_name(tmp_path, option, message):
    from glade.tiny import tiny_model

    tiny_model(**option).save_pretrained(tmp_path / "glade")
    destination = tmp_path / "out"
    assert_fails_cleanly(
        lambda: export_gpt2(tmp_path / "glade", destination), destination, ValueError,
        f"Glade config uses {message}, which GPT-2 cannot express",
    )


def test_export_refuses_a_gpt2_checkpoint(tmp_path, gpt2_dir):
    destination = tmp_path / "out"
    assert_fails_cleanly(
        lambda: export_gpt2(gpt2_dir, destination), destination, ValueError, "is not a glade config"
    )


def test_non_empty_destination_is_refused_unless_overwrite(tmp_path, gpt2_dir):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="is not empty; pass --overwrite"):
        convert_gpt2(gpt2_dir, destination)
    assert (destination / "keep.txt").read_text() == "precious"
    convert_gpt2(gpt2_dir, destination, overwrite=True)
    assert not (destination / "keep.txt").exists() and (destination / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_empty_destination_is_used(tmp_path, gpt2_dir):
    destination = tmp_path / "out"
    destination.mkdir()
    convert_gpt2(gpt2_dir, destination)
    assert (destination / "config.json").is_file()


def test_a_failure_while_writing_leaves_the_old_destination_untouched(tmp_path):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(destination, overwrite=True) as staging:
            (staging / "half.bin").write_bytes(b"\0" * 10)
            raise RuntimeError("disk full")
    assert [p.name for p in destination.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_wrongly_typed_config_field_is_a_value_error(tmp_path, gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    config["n_embd"] = "64"
    (gpt2_dir / "config.json").write_text(json.dumps(config))
    destination = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_gpt2(gpt2_dir, destination), destination, ValueError, "config.json: .*n_embd"
    )


@pytest.mark.parametrize("command", [["export", "gpt2"], ["export", "stock"], ["export", "gguf"], ["export", "onnx"]])
def test_nan_weights_are_refused_by_every_export(tmp_path, make_glade, capsys, command):
    source = make_glade()
    rewrite_weights(source, lambda tensors: tensors["transformer.h.0.attn.c_attn.weight"].view(-1)[0].fill_(math.inf))
    destination = tmp_path / "out" / ("model.gguf" if command[1] == "gguf" else "model")
    with pytest.raises(SystemExit) as exit_info:
        main([*command, str(source), str(destination)])
    assert exit_info.value.code == 2
    assert "holds NaN or infinite weights in transformer.h.0.attn.c_attn.weight" in capsys.readouterr().err
    assert not destination.exists()
