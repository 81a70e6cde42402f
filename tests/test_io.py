"""Atomic writes (``lmlab.io``) when the write fails part-way: the old file or folder is left whole,
and no temporary file or folder is left beside it. Each case makes one step raise: the writer
after half its bytes, the serializer, the final ``os.replace``, the swap of a folder."""

import json
import os

import pytest
import torch

from lmlab import io
from lmlab.io import (
    atomic_dir,
    committed_dir,
    load_tensors,
    save_npy,
    save_tensors,
    write_atomic,
    write_json,
    write_jsonl,
    write_text,
)


class Crash(Exception):
    """What a failing writer raises (a full disk, a bug in a serializer)."""


def leftovers(folder) -> list[str]:
    """Entries a failed write may have left: lmlab's temporaries are hidden ``.<name>.*`` entries."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def half_then_crash(tmp):
    tmp.write_bytes(b'{"new": ')  # half a file
    raise Crash


@pytest.fixture
def old(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"step": 1})
    assert leftovers(tmp_path) == []
    return path


def test_success_replaces_the_file_and_leaves_nothing_beside_it(old):
    write_json(old, {"step": 2})
    assert json.loads(old.read_text()) == {"step": 2} and leftovers(old.parent) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert old.stat().st_mode & 0o777 == 0o666 & ~umask  # the umask's permissions, not mkstemp's 0600


def test_writer_that_raises_half_way(old):
    with pytest.raises(Crash):
        write_atomic(old, half_then_crash)
    assert json.loads(old.read_text()) == {"step": 1} and leftovers(old.parent) == []


def test_no_old_file_means_no_file(tmp_path):
    with pytest.raises(Crash):
        write_atomic(tmp_path / "new.json", half_then_crash)
    assert list(tmp_path.iterdir()) == []


def test_payload_that_cannot_be_serialized(old):
    with pytest.raises(TypeError):
        write_json(old, {"step": 2, "model": object()})
    with pytest.raises(TypeError):
        write_jsonl(old, [{"ok": 1}, {"bad": {1, 2}}])
    assert json.loads(old.read_text()) == {"step": 1} and leftovers(old.parent) == []


def test_serializer_that_raises_mid_file(tmp_path, monkeypatch):
    """safetensors writes part of the file, then fails: the old tensors stay loadable."""
    import safetensors.torch

    path = tmp_path / "w.safetensors"
    save_tensors(path, {"w": torch.ones(3)})

    def partial(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 16)
        raise Crash

    monkeypatch.setattr(safetensors.torch, "save_file", partial)
    with pytest.raises(Crash):
        save_tensors(path, {"w": torch.zeros(3)})
    assert torch.equal(load_tensors(path)["w"], torch.ones(3)) and leftovers(tmp_path) == []


def test_numpy_save_that_raises(tmp_path):
    import numpy as np

    path = tmp_path / "a.npy"
    save_npy(path, np.arange(3))
    with pytest.raises(ValueError):  # object arrays need pickle, which save_npy refuses
        save_npy(path, np.array([{"a": 1}], dtype=object))
    assert np.load(path).tolist() == [0, 1, 2] and leftovers(tmp_path) == []


def test_replace_that_raises(old, monkeypatch):
    """The last step, the rename over the old file, fails (e.g. the target became a folder)."""
    def refuse(src, dst):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(OSError):
        write_text(old, "new")
    monkeypatch.undo()
    assert json.loads(old.read_text()) == {"step": 1} and leftovers(old.parent) == []


def test_unwritable_folder_is_one_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(io.LmlabError, match="cannot write"):
        write_text(blocker / "sub" / "a.txt", "new")


# --- folders ------------------------------------------------------------------------------------


@pytest.fixture
def old_dir(tmp_path):
    path = tmp_path / "best"
    with atomic_dir(path) as tmp:
        (tmp / "weights").write_text("old weights")
        (tmp / "state.json").write_text('{"step": 1}')
    return path


def test_folder_write_that_raises_half_way(old_dir):
    with pytest.raises(Crash), atomic_dir(old_dir) as tmp:
        (tmp / "weights").write_text("new weights")
        raise Crash
    assert sorted(p.name for p in old_dir.iterdir()) == ["state.json", "weights"]
    assert (old_dir / "weights").read_text() == "old weights" and leftovers(old_dir.parent) == []


def test_folder_swap_that_fails_between_its_renames(old_dir, monkeypatch):
    """The old folder is moved aside, then moving the new one in fails (as a kill there would
    leave it): ``committed_dir`` finds the whole old folder, and the temporary one is gone."""
    from pathlib import Path

    real = Path.rename

    def rename(self, target):
        if self.name.endswith(".tmp"):  # the new folder's move into place
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError), atomic_dir(old_dir) as tmp:
        (tmp / "weights").write_text("new weights")
    monkeypatch.undo()
    found = committed_dir(old_dir)
    assert found is not None and found != old_dir and (found / "weights").read_text() == "old weights"
    assert not any(name.endswith(".tmp") for name in os.listdir(old_dir.parent))
    with atomic_dir(old_dir) as tmp:  # the next save recovers: the new folder in place, the old one gone
        (tmp / "weights").write_text("newer weights")
    assert committed_dir(old_dir) == old_dir and (old_dir / "weights").read_text() == "newer weights"
    assert leftovers(old_dir.parent) == []
