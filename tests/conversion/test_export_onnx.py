"""`glade export onnx`: one graph, dynamic in batch and sequence, whose logits are PyTorch's."""

import json
import sys

import numpy as np
import pytest
import torch

from checkpoint_helpers import rewrite_weights
from export_helpers import saved_random_glade
from glade import GladeConfig
from glade.cli import main
from glade.conversion import onnx as onnx_export

CONFIGS = {
    "gpt2": {},
    "modern": dict(positions="rotary", norm="rmsnorm", qk_norm=True, activation_function="swiglu", n_kv_head=2,
                   bias=False, logit_softcap=30.0),
}


@pytest.fixture(scope="module", params=CONFIGS)
def exported(request, tmp_path_factory):
    """(Glade model, export folder) for each config, exported once through the command line."""
    pytest.importorskip("onnxscript")
    tmp_path = tmp_path_factory.mktemp(request.param)
    model = saved_random_glade(tmp_path / "glade", **CONFIGS[request.param])
    assert main(["export", "onnx", str(tmp_path / "glade"), str(tmp_path / "onnx")]) == 0
    return model, tmp_path / "onnx"


@pytest.mark.slow
def test_the_folder_holds_graph_config_and_tokenizer(exported):
    import onnx

    model, folder = exported
    graph = onnx.load(str(folder / "model.onnx")).graph
    assert [tensor.name for tensor in graph.input] == ["input_ids", "attention_mask"]
    assert [tensor.name for tensor in graph.output] == ["logits"]
    for tensor in (*graph.input, *graph.output):
        batch, sequence = tensor.type.tensor_type.shape.dim[:2]
        assert batch.dim_param and sequence.dim_param, f"{tensor.name} has a fixed batch or sequence size"
    config = GladeConfig.from_pretrained(folder)
    fields = ("vocab_size", "n_positions", "positions", "eos_token_id", "pad_token_id")
    assert {name: getattr(config, name) for name in fields} == {name: getattr(model.config, name) for name in fields}
    # Only the config's entry point: the folder has the config class's file and no PyTorch model.
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_glade.GladeConfig"}
    assert (folder / "configuration_glade.py").is_file()
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == model.config.eos_token_id
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("batch_size,length", [(3, 7), (1, 19)])
def test_onnxruntime_logits_equal_pytorchs_for_any_batch_and_length(exported, batch_size, length):
    onnxruntime = pytest.importorskip("onnxruntime")
    model, folder = exported
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    input_ids = torch.randint(0, 256, (batch_size, length), generator=torch.Generator().manual_seed(length))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, : length // 3] = 0  # left padding in the last row
    (logits,) = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool().numpy()
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits[real], expected.numpy()[real], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_a_longer_sequence_than_n_positions_is_refused_by_a_named_node(exported):
    onnxruntime = pytest.importorskip("onnxruntime")
    model, folder = exported
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    n_positions = model.config.n_positions
    input_ids = np.zeros((1, n_positions), dtype=np.int64)
    (logits,) = session.run(None, {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)})
    assert logits.shape[1] == n_positions
    # PyTorch refuses it too; without the check a rotary graph ran any length.
    too_long = np.zeros((1, n_positions + 1), dtype=np.int64)
    invalid_argument = onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument
    with pytest.raises(invalid_argument, match=rf"{onnx_export.TOO_LONG_NODE}.*idx={n_positions} must be within"):
        session.run(None, {"input_ids": too_long, "attention_mask": np.ones_like(too_long)})


DAMAGE = {
    "missing": (lambda tensors: tensors.pop("transformer.h.0.attn.c_proj.weight"),
                "missing transformer.h.0.attn.c_proj.weight"),
    "unexpected": (lambda tensors: tensors.update(extra=torch.zeros(2)), "unexpected extra"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_checkpoint_that_does_not_match_its_config_is_refused_before_anything_is_written(tmp_path, capsys, damage):
    # Refused before the exporter's modules are needed: runs without them.
    edit, problem = DAMAGE[damage]
    saved_random_glade(tmp_path / "glade")
    rewrite_weights(tmp_path / "glade", edit)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "onnx", str(tmp_path / "glade"), str(tmp_path / "onnx")])
    assert exit_info.value.code == 2
    error = f"glade export: error: {tmp_path / 'glade'} does not match its config: {problem}"
    assert capsys.readouterr().err.splitlines()[-1] == error
    assert not (tmp_path / "onnx").exists()


def test_another_model_type_is_refused_by_name(tmp_path, gpt2_dir):
    with pytest.raises(ValueError, match=r"is not a glade config \(model_type='gpt2', expected 'glade'\)"):
        onnx_export.export_onnx(gpt2_dir, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_a_missing_exporter_names_the_extra_to_install(tmp_path, monkeypatch, capsys):
    saved_random_glade(tmp_path / "glade")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what Python reports for a module that is not installed
    with pytest.raises(ModuleNotFoundError, match=r"needs onnxscript: pip install 'glade\[onnx\]'"):
        onnx_export.export_onnx(tmp_path / "glade", tmp_path / "onnx")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "onnx", str(tmp_path / "glade"), str(tmp_path / "onnx")])
    assert exit_info.value.code == 2
    assert "glade export: error: glade export onnx needs onnxscript: pip install" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()
