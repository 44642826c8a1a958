import json

import pytest

from glade.training.checkpoint import (
    MARKER,
    TRAINER_STATE,
    CheckpointError,
    checkpoint_dir,
    find_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    verify_checkpoint,
    write_marker,
)


def fake_checkpoint(output_dir, step, complete=True):
    """The layout save_checkpoint leaves, with small stand-in files."""
    path = checkpoint_dir(output_dir, step)
    (path / "pytorch_model_fsdp_0").mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights" * step)
    (path / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"shard")
    (path / TRAINER_STATE).write_text(json.dumps({"step": step}))
    if complete:
        write_marker(path, step)
    return path


def test_a_complete_checkpoint_verifies_and_lists_every_file(tmp_path):
    path = fake_checkpoint(tmp_path, 4)
    assert verify_checkpoint(path) == {"step": 4}
    manifest = json.loads((path / MARKER).read_text())
    assert manifest["step"] == 4
    assert set(manifest["files"]) == {"model.safetensors", "pytorch_model_fsdp_0/__0_0.distcp", TRAINER_STATE}


def test_damage_is_named(tmp_path):
    incomplete = fake_checkpoint(tmp_path, 2, complete=False)
    with pytest.raises(CheckpointError, match=f"{incomplete} is incomplete: it has no COMPLETE marker"):
        verify_checkpoint(incomplete)

    changed = fake_checkpoint(tmp_path, 4)
    (changed / "model.safetensors").write_bytes(b"weightz" * 4)  # same size, different bytes
    with pytest.raises(CheckpointError, match="is corrupt: model.safetensors does not match its recorded checksum"):
        verify_checkpoint(changed)

    missing = fake_checkpoint(tmp_path, 6)
    (missing / "pytorch_model_fsdp_0" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="is corrupt: pytorch_model_fsdp_0/__0_0.distcp is missing"):
        verify_checkpoint(missing)

    garbled = fake_checkpoint(tmp_path, 8)
    (garbled / MARKER).write_text("{not json")
    with pytest.raises(CheckpointError, match="its COMPLETE marker is unreadable"):
        verify_checkpoint(garbled)


def test_resume_latest_refuses_a_damaged_newest_checkpoint_unless_asked_to_fall_back(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4, 6]
    with pytest.raises(CheckpointError, match=r"checkpoint-6 is incomplete.*Pass --resume-fallback"):
        find_checkpoint(tmp_path, "latest")
    assert find_checkpoint(tmp_path, "latest", fallback=True) == checkpoint_dir(tmp_path, 4)
    # An explicit path falls back only to older checkpoints beside it.
    assert find_checkpoint(tmp_path, str(checkpoint_dir(tmp_path, 6)), fallback=True) == checkpoint_dir(tmp_path, 4)
    assert find_checkpoint(tmp_path, str(checkpoint_dir(tmp_path, 2))) == checkpoint_dir(tmp_path, 2)


def test_unfinished_staging_directories_are_not_checkpoints(tmp_path):
    fake_checkpoint(tmp_path, 2)
    (tmp_path / ".checkpoint-4.tmp").mkdir()  # a run killed while saving step 4
    assert find_checkpoint(tmp_path, "latest") == checkpoint_dir(tmp_path, 2)


def test_resume_with_nothing_to_resume_from(tmp_path):
    with pytest.raises(CheckpointError, match="has no checkpoint-STEP directories to resume from"):
        find_checkpoint(tmp_path, "latest")
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoint-3"))
    fake_checkpoint(tmp_path, 2, complete=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint to resume from"):
        find_checkpoint(tmp_path, "latest", fallback=True)


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 10):
        fake_checkpoint(tmp_path, step)
    prune_checkpoints(tmp_path, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 10]
    prune_checkpoints(tmp_path, keep_last=0)
    assert len(list_checkpoints(tmp_path)) == 2
