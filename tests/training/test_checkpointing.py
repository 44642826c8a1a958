import errno
import json
import os
from pathlib import Path

import pytest

from glade.atomic import NoSpaceLeftError
from glade.training.checkpointing import (
    MARKER,
    TRAINER_STATE,
    CheckpointError,
    checkpoint_dir,
    find_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
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
    with pytest.raises(CheckpointError, match="its COMPLETE manifest is unreadable"):
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


class FakeAccelerator:
    """What save_checkpoint uses of accelerate's Accelerator; save_state writes 0.3 MB, then fails as a full disk
    does if asked to."""

    is_main_process = True

    def __init__(self, fail: bool):
        self.fail = fail

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"w" * 300_000)
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_that_fills_the_disk_is_one_line_and_leaves_nothing(tmp_path):
    with pytest.raises(NoSpaceLeftError, match=rf"{checkpoint_dir(tmp_path, 3)}: no space left on device"):
        save_checkpoint(FakeAccelerator(fail=True), tmp_path, 3, {"step": 3}, keep_last=0)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_is_flushed_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    import glade.training.checkpointing as checkpoint_module

    flushed = []
    monkeypatch.setattr(checkpoint_module, "fsync_tree", lambda path: flushed.append(sorted(os.listdir(path))))
    path = save_checkpoint(FakeAccelerator(fail=False), tmp_path, 3, {"step": 3}, keep_last=0)
    assert flushed == [[MARKER, "model.safetensors", TRAINER_STATE]]  # the staged folder, marker included
    assert verify_checkpoint(path) == {"step": 3}


def test_resume_at_an_output_folder_or_an_exported_model_says_what_to_pass_instead(tmp_path):
    fake_checkpoint(tmp_path, 4)
    with pytest.raises(CheckpointError, match=rf"{tmp_path} is an output directory, not a checkpoint: pass --resume "
                                              rf"latest with --output-dir {tmp_path}"):
        find_checkpoint(tmp_path, str(tmp_path))
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is an exported model, not a training checkpoint: start a new run from "
                                              "it with --init-from"):
        find_checkpoint(tmp_path, str(final))
    with pytest.raises(CheckpointError, match="is not a checkpoint-STEP directory"):
        find_checkpoint(tmp_path, str(tmp_path / "elsewhere"))
