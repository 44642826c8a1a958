import json

import pytest
import torch

from checkpoint_helpers import rewrite_weights
from glade import GladeConfig, GladeForCausalLM
from glade.loading import (
    check_weights,
    load_causal_lm,
    load_model_and_tokenizer,
    read_config_file,
    read_glade_config,
    resolve_checkpoint,
)
from glade.tiny import byte_level_tokenizer, tiny_model

DROPPED = "transformer.h.1.mlp.c_fc.weight"


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "checkpoint"
    tiny_model().save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path


def test_a_missing_directory_is_reported_as_one_not_as_a_bad_hub_id(tmp_path):
    for name in ("/no/such/dir", "./no-such-dir", "~/no-such-dir", "runs/small/final"):
        with pytest.raises(FileNotFoundError, match=f"^model directory {name} does not exist$"):
            resolve_checkpoint(name)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.bin is a file"):
        resolve_checkpoint(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="is not a model directory: it has no config.json"):
        resolve_checkpoint(tmp_path)
    assert resolve_checkpoint("openai-community/gpt2") == "openai-community/gpt2"  # left to the Hub


def test_a_saved_config_json_reads_back_as_the_same_config(checkpoint):
    saved = json.loads((checkpoint / "config.json").read_text())
    assert {"model_type", "auto_map", "architectures", "transformers_version"} <= saved.keys()
    config = read_config_file(checkpoint / "config.json", n_layer=3)
    assert isinstance(config, GladeConfig) and config.n_layer == 3
    assert config.to_diff_dict() | {"n_layer": 2} == read_glade_config(str(checkpoint)).to_diff_dict()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model_type": "gpt2", "n_embd": 64}, r"is not a glade config \(model_type='gpt2', expected 'glade'\)"),
        ({"n_layers": 2, "n_embd": 64, "hidden": 3}, r"has unknown GladeConfig field\(s\): hidden, n_layers$"),
        ([2, 64], r"must hold a JSON object of GladeConfig fields"),
    ],
)
def test_a_config_file_with_foreign_or_unknown_fields_is_refused(tmp_path, fields, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=message):
        read_config_file(path)


def test_canonical_aliases_are_known_fields(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64, "n_head": 4, "num_hidden_layers": 1}))
    assert (read_config_file(path).n_embd, read_config_file(path).n_layer) == (64, 1)


DAMAGE = {
    "missing tensor": (lambda tensors: tensors.pop(DROPPED), f"missing {DROPPED}"),
    "extra tensor": (lambda tensors: tensors.update(extra=torch.zeros(2)), "unexpected extra"),
    "config mismatch": (
        lambda tensors: tensors.update({DROPPED: tensors[DROPPED][:, :-1].contiguous()}),
        rf"{DROPPED} has shape \[256, 63\], the config needs \[256, 64\]",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_checkpoint_that_does_not_match_its_config_is_refused_by_name(checkpoint, damage):
    edit, message = DAMAGE[damage]
    rewrite_weights(checkpoint, edit)
    with pytest.raises(ValueError, match=f"checkpoint does not match its config: {message}"):
        load_causal_lm(str(checkpoint))
    with pytest.raises(ValueError, match=message):
        check_weights(str(checkpoint), GladeConfig.from_pretrained(checkpoint))


@pytest.mark.slow
def test_an_intact_checkpoint_loads_its_own_weights(checkpoint):
    model, tokenizer = load_model_and_tokenizer(str(checkpoint))
    assert isinstance(model, GladeForCausalLM) and len(tokenizer) == 257
    for name, tensor in tiny_model().state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    check_weights(str(checkpoint))


@pytest.mark.parametrize("edit", [{"n_layer": 100_000}, {"n_embd": 64 * 1024, "n_head": 4}])
def test_a_config_far_larger_than_its_weights_is_refused_before_the_model_is_built(checkpoint, edit, monkeypatch):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, **edit}))

    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(GladeForCausalLM, "__init__", built)
    with pytest.raises(ValueError, match=r"config.json describes a model of [\d,]+ parameters .* but its weights "
                                         r"hold 124,736: the config does not belong to these weights$"):
        load_causal_lm(str(checkpoint))
