"""Hub ids resolve through huggingface_hub.snapshot_download (faked here: the suite never touches the network)."""

import fnmatch
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import LocalEntryNotFoundError

from glade import GladeForCausalLM
from glade.conversion import convert_gpt2, saving


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Serve repos from local folders: each call copies the files matching allow_patterns into a fresh snapshot."""
    repos, calls = {}, []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, list(allow_patterns)))
        if repo_id not in repos:
            raise LocalEntryNotFoundError(f"{repo_id} is not cached and the hub cannot be reached")
        snapshot = tmp_path / "snapshots" / f"{repo_id.replace('/', '--')}-{len(calls)}"
        snapshot.mkdir(parents=True)
        for path in repos[repo_id].iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copy(path, snapshot / path.name)
        return str(snapshot)

    monkeypatch.setattr(saving, "snapshot_download", snapshot_download)
    return repos, calls


@pytest.mark.slow
def test_a_hub_id_downloads_only_safetensors_weights_and_metadata(tmp_path, gpt2_dir, gpt2_model, fake_hub):
    repos, calls = fake_hub
    torch.save(gpt2_model.state_dict(), gpt2_dir / "pytorch_model.bin")
    (gpt2_dir / "flax_model.msgpack").write_bytes(b"not needed")
    repos["openai-community/gpt2"] = gpt2_dir
    convert_gpt2("openai-community/gpt2", tmp_path / "glade")
    assert len(calls) == 1 and calls[0][0] == "openai-community/gpt2"
    snapshot = sorted((tmp_path / "snapshots").iterdir())[0]
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    glade = GladeForCausalLM.from_pretrained(tmp_path / "glade")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (glade(ids).logits - gpt2_model(ids).logits).abs().max() <= 1e-5


def test_the_cards_license_and_datasets_come_from_the_repos_card(tmp_path, gpt2_dir, fake_hub):
    repos, _ = fake_hub
    (gpt2_dir / "README.md").write_text("---\nlicense: mit\ndatasets:\n- openwebtext\n---\n# GPT-2\n")
    repos["openai-community/gpt2"] = gpt2_dir
    convert_gpt2("openai-community/gpt2", tmp_path / "glade")
    card = ModelCard.load(tmp_path / "glade" / "README.md")
    assert (card.data.license, card.data.datasets) == ("mit", ["openwebtext"])
    assert "It was converted from `openai-community/gpt2`" in card.text


@pytest.mark.slow
def test_a_repo_with_only_pickled_weights_falls_back_to_them(tmp_path, gpt2_dir, gpt2_model, fake_hub):
    repos, calls = fake_hub
    (gpt2_dir / "model.safetensors").unlink()
    torch.save(gpt2_model.state_dict(), gpt2_dir / "pytorch_model.bin")
    repos["someone/old-gpt2"] = gpt2_dir
    convert_gpt2("someone/old-gpt2", tmp_path / "glade")
    assert len(calls) == 2 and any("bin" in pattern for pattern in calls[1][1])
    assert (tmp_path / "glade" / "model.safetensors").is_file()


def test_an_unreachable_hub_id_is_a_file_not_found_error(tmp_path, fake_hub):
    with pytest.raises(FileNotFoundError, match="'someone/missing' is neither a local directory nor a reachable hub"):
        convert_gpt2("someone/missing", tmp_path / "glade")
    assert not (tmp_path / "glade").exists()


def test_a_missing_path_that_cannot_be_a_hub_id_is_not_looked_up(tmp_path, fake_hub):
    _, calls = fake_hub
    with pytest.raises(FileNotFoundError, match="model directory ./models/gpt2 does not exist"):
        convert_gpt2("./models/gpt2", tmp_path / "glade")
    assert calls == []
