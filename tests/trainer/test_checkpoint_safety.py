"""Checkpoints an operator can trust: nothing in a checkpoint runs code, damaged files are found and
the previous checkpoint is used, a full disk is named and cleaned up. In-process, one rank."""
from __future__ import annotations

import errno
import logging
import os
import pickle
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import MARKER, Checkpointer, UnsafeCheckpointError, file_manifest, verify
from trainer.errors import CheckpointError


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((64, 8), v), "b": torch.arange(5) + int(v)}, "n": torch.tensor(int(v))}


def _blank() -> dict:
    return {"model": {"w": torch.zeros(64, 8), "b": torch.zeros(5, dtype=torch.long)}, "n": torch.tensor(0)}


def _two_checkpoints(root: Path) -> Checkpointer:
    ck = Checkpointer(root, rank=0, keep=3)
    ck.save(10, _state(1.0), {"step": 10})
    ck.save(20, _state(2.0), {"step": 20})
    return ck


def _refresh_marker(path: Path) -> None:
    """What an attacker who can write the directory would do: make the checksums match again."""
    import json

    m = json.loads((path / MARKER).read_text())
    m["files"] = file_manifest(path)
    (path / MARKER).write_text(json.dumps(m))


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_marker_lists_every_file_with_size_and_sha256(tmp_path):
    ck = _two_checkpoints(tmp_path)
    latest = ck.latest()
    import json

    files = json.loads((latest / MARKER).read_text())["files"]
    assert set(files) == {p.name for p in latest.iterdir() if p.name != MARKER}
    assert {".metadata", "trainer_state.json", "rng_rank0.pt"} <= set(files)
    assert all(f["bytes"] == (latest / n).stat().st_size and len(f["sha256"]) == 64 for n, f in files.items())
    assert verify(latest) is None


def test_malicious_metadata_is_refused_and_never_runs(tmp_path, caplog):
    ck = _two_checkpoints(tmp_path)
    newest = ck.latest()
    ran = tmp_path / f"pwned-{uuid.uuid4().hex}"
    (newest / ".metadata").write_bytes(pickle.dumps(_Evil(str(ran))))
    _refresh_marker(newest)                       # checksums match: only the unpickler stands in the way
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle (posix|os)\.system"):
        ck.load(newest, _blank())
    assert not ran.exists()
    # resuming falls back to the previous checkpoint, saying which one was refused
    got = _blank()
    with caplog.at_level(logging.ERROR, logger="tailrec.checkpoint"):
        path, meta = ck.load_latest(got)
    assert path.name == "step_000000010" and meta["step"] == 10 and torch.equal(got["model"]["w"], _state(1.0)["model"]["w"])
    assert "step_000000020" in caplog.text and "refusing to unpickle" in caplog.text
    assert not ran.exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path, n: int = 400) -> None:
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - n // 2)
    for i in range(start, min(len(data), start + n)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate_distcp", "truncate_metadata", "flip_distcp"])
def test_damaged_newest_falls_back_to_previous(tmp_path, caplog, damage):
    ck = _two_checkpoints(tmp_path)
    newest = ck.latest()
    distcp = next(newest.glob("*.distcp"))
    {"truncate_distcp": lambda: _truncate(distcp), "truncate_metadata": lambda: _truncate(newest / ".metadata"),
     "flip_distcp": lambda: _flip(distcp)}[damage]()
    bad = distcp if "distcp" in damage else newest / ".metadata"
    assert str(bad) in verify(newest)
    got = _blank()
    with caplog.at_level(logging.ERROR, logger="tailrec.checkpoint"):
        path, meta = ck.load_latest(got)
    assert meta["step"] == 10 and torch.equal(got["model"]["b"], _state(1.0)["model"]["b"])
    assert str(bad) in caplog.text


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    ck = Checkpointer(tmp_path, rank=0)
    ck.save(10, _state(1.0), {"step": 10})
    _flip(next(ck.latest().glob("*.distcp")))
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*SHA-256 differs.*--checkpoint.resume=false"):
        ck.load_latest(_blank())


def test_unreadable_metadata_names_the_file(tmp_path):
    ck = Checkpointer(tmp_path, rank=0)
    ck.save(10, _state(1.0), {"step": 10})
    path = ck.latest()
    _truncate(path / ".metadata")
    _refresh_marker(path)               # sizes match the damage: the reader itself must say what is wrong
    with pytest.raises(CheckpointError, match=r"\.metadata: unreadable checkpoint metadata"):
        ck.load(path, _blank())


def _assert_enospc_handled(ck: Checkpointer, e: pytest.ExceptionInfo, root: Path) -> None:
    msg = str(e.value)
    assert "ENOSPC" in msg and "no space left on device" in msg and str(root) in msg
    assert "step_000000010 is intact" in msg
    assert not list(root.glob("*.partial"))
    got = _blank()
    path, meta = ck.load_latest(got)
    assert meta["step"] == 10 and torch.equal(got["model"]["w"], _state(1.0)["model"]["w"])


def test_disk_full_injected(tmp_path, monkeypatch):
    """ENOSPC from DCP's file writer (fault injection: works without mount privileges)."""
    from torch.distributed.checkpoint import filesystem

    ck = Checkpointer(tmp_path, rank=0)
    ck.save(10, _state(1.0), {"step": 10})

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(filesystem, "_write_item", full)
    with pytest.raises(CheckpointError) as e:
        ck.save(20, _state(2.0), {"step": 20})
    _assert_enospc_handled(ck, e, tmp_path)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the injected test covers it")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_on_a_real_small_tmpfs(small_tmpfs):
    ck = Checkpointer(small_tmpfs, rank=0)
    ck.save(10, _state(1.0), {"step": 10})                       # ~10 KB: fits
    big = {"model": {"w": torch.randn(400, 400), "b": torch.arange(5)}, "n": torch.tensor(2)}   # 640 KB: not
    with pytest.raises(CheckpointError) as e:
        ck.save(20, big, {"step": 20})
    _assert_enospc_handled(ck, e, small_tmpfs)
