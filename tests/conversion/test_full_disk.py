"""A disk that fills while a command writes: one line naming the path, nothing left behind; what is written is
flushed to disk before it is renamed into place; and a process killed at any point leaves the old result or the
whole new one."""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors import SafetensorError

import glade.atomic as atomic
from glade.atomic import NoSpaceLeftError, atomic_directory, atomic_file
from glade.cli import main

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_staging_a_folder_names_it_and_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(NoSpaceLeftError, match=rf"^{target}: no space left on device \(it needed more than the 0.5 MB"):
        with atomic_directory(target) as staging:
            (staging / "model.safetensors").write_bytes(b"x" * 500_000)
            raise NO_SPACE
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_only_counts_bytes_is_recognised_by_the_free_space_left(tmp_path, monkeypatch):
    # numpy's tofile (gguf's writer) says only this; the free space tells a full disk from another failure.
    short_write = OSError("65536 requested and 12424 written")
    with pytest.raises(OSError) as raised, atomic_file(tmp_path / "model.gguf") as temporary:
        temporary.write_bytes(b"x" * 100)
        raise short_write
    assert raised.value is short_write  # plenty of space: the writer's own error
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(NoSpaceLeftError, match="model.gguf: no space left on device .* 0.0 MB free"):
        with atomic_file(tmp_path / "model.gguf") as temporary:
            raise short_write
    assert list(tmp_path.iterdir()) == []


def test_other_failures_and_interrupts_pass_through_unchanged_even_on_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    for error in (ValueError("bad tensor"), KeyboardInterrupt()):
        with pytest.raises(type(error)) as raised, atomic_directory(tmp_path / "out"):
            raise error
        assert raised.value is error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", [["export", "gpt2"], ["export", "stock"], ["export", "gguf"]])
def test_export_commands_on_a_full_disk_end_in_one_line(tmp_path, make_glade, monkeypatch, capsys, command):
    source = make_glade()
    destination = tmp_path / "exported" / ("model.gguf" if command[1] == "gguf" else "model")

    def fail(*args, **kwargs):
        if command[1] == "gguf":
            raise OSError("65536 requested and 12424 written")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", fail)
    monkeypatch.setattr("gguf.GGUFWriter.write_tensors_to_file", fail)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(SystemExit) as exit_info:
        main([*command, str(source), str(destination)])
    assert exit_info.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line and "Writing model shards" not in line]
    assert line.startswith(f"glade export: error: {destination}: no space left on device (it needed more than")
    assert not destination.parent.exists() or list(destination.parent.iterdir()) == []


def test_staged_files_and_folders_are_flushed_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(atomic, "fsync_path", lambda path: events.append(("fsync", Path(path).name)))
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (events.append(("rename", Path(dst).name)),
                                                                 real_replace(src, dst)))
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "weights.bin").write_bytes(b"w")
        (staging / "config.json").write_text("{}")
    rename = events.index(("rename", "model"))
    flushed_before = {name for kind, name in events[:rename] if kind == "fsync"}
    assert {"weights.bin", "sub", "config.json", staging.name} <= flushed_before
    assert events[rename + 1:] == [("fsync", tmp_path.name)]


KILL_POINTS = ["after a file", "before the rename", "between the two renames", "after the rename"]


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_process_killed_while_writing_leaves_the_old_folder_or_the_whole_new_one(tmp_path, point):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    code = f"""
        import os
        from pathlib import Path
        import glade.atomic as atomic

        point = {point!r}
        real_fsync_tree, real_replace = atomic.fsync_tree, os.replace

        def fsync_tree(path):
            real_fsync_tree(path)
            if point == "before the rename":
                os._exit(9)

        def replace(source, destination):
            real_replace(source, destination)
            if point == "after the rename" and Path(destination) == Path({str(target)!r}):
                os._exit(9)
            if point == "between the two renames" and Path(destination).parent.name.startswith(".model.old-"):
                os._exit(9)

        atomic.fsync_tree, atomic.os.replace = fsync_tree, replace
        with atomic.atomic_directory(Path({str(target)!r})) as staging:
            (staging / "model.safetensors").write_bytes(b"new weights")
            if point == "after a file":
                os._exit(9)
            (staging / "config.json").write_text("new")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr
    if point == "between the two renames":  # the old folder is aside until the next write to the folder
        assert not target.exists()
    atomic.clean_interrupted_writes(target)
    assert list(tmp_path.iterdir()) == [target]
    contents = {path.name: path.read_bytes() for path in target.iterdir()}
    if point == "after the rename":
        assert contents == {"model.safetensors": b"new weights", "config.json": b"new"}
    else:
        assert contents == {"config.json": b"old"}
