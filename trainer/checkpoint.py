"""Checkpoints with torch.distributed.checkpoint (DCP): sharded weights, fused optimizer state
(counters, step), dense optimizer, trainer/loader position, per-rank RNG and the config.

Writing: into ``step_XXXXXXXXX.partial/``; after every rank finished, rank 0 writes the trainer state
(JSON), renames the directory and writes the ``COMPLETE`` marker last. The marker is JSON listing every
file with its size and SHA-256. A crash mid-save never leaves a directory that ``latest()`` would pick;
a failed save (disk full: ENOSPC is named with the path) removes its partial directory on every rank and
leaves the previous checkpoints as they were.

Reading: the files are checked against the marker first (size, then SHA-256) and DCP's pickled
``.metadata`` is read by ``SafeFileSystemReader``, whose unpickler accepts only the classes DCP's metadata
is made of (``_ALLOWED``); anything else (a crafted file naming ``os.system``, say) is refused before it
can run. Tensors are read by DCP with ``torch.load(weights_only=True)``, RNG files likewise, and the
trainer state is JSON. ``load_latest`` falls back from a bad newest checkpoint to the previous complete
one, logging which file was wrong; with none left it raises ``CheckpointError`` (exit code 2).
DCP reshards on load, so a checkpoint saved with 2 ranks loads with 1 and the reverse.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import pickle
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_md

from trainer.dist import barrier
from trainer.errors import CheckpointError

MARKER = "COMPLETE"
log = logging.getLogger("tailrec.checkpoint")

# Everything a DCP .metadata pickle may name (torch 2.13): its dataclasses, torch.Size, dtypes, the
# layout helper TensorProperties uses, and pathlib paths (file names in _StorageInfo).
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's metadata names something outside the allow-list (nothing of it was run)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refusing to unpickle {module}.{name}: not part of DCP's checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with an allow-listed unpickler for ``.metadata`` (DCP uses pickle.load)."""

    def read_metadata(self, *args, **kwargs) -> dcp_md.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            raw = f.read()
        try:
            md = _MetadataUnpickler(io.BytesIO(raw)).load()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{path}: {e}") from None
        except Exception as e:  # truncated / garbage: name the file instead of a bare EOFError
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
        if not isinstance(md, dcp_md.Metadata):
            raise UnsafeCheckpointError(f"{path}: holds a {type(md).__name__}, not DCP metadata")
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_md.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_manifest(directory: Path) -> dict[str, dict]:
    """{relative file name: {"bytes", "sha256"}} of every file under ``directory`` but the marker."""
    return {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _file_digest(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MARKER}


def verify(path: Path) -> str | None:
    """None if every file listed in the marker is present with its size and SHA-256, else why not.
    A marker from before checksums (a bare timestamp) cannot be verified: accepted with a warning."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        log.warning("%s: marker has no file checksums (older checkpoint); loading it unverified", path)
        return None
    for name, want in marker.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != want["bytes"]:
            return f"{f}: {f.stat().st_size} bytes, the marker says {want['bytes']} (truncated or replaced)"
        if _file_digest(f) != want["sha256"]:
            return f"{f}: SHA-256 differs from the marker (corrupted)"
    return None


def _no_space(exc: BaseException) -> bool:
    """ENOSPC anywhere in ``exc``: DCP wraps per-rank failures in CheckpointException(failures={rank: e})."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [v for v in failures.values() if isinstance(v, BaseException)]
        if "No space left on device" in str(e):
            return True
    return False


def _nearly_full(path: Path, margin: int = 64 << 10) -> bool:
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free < margin
    except OSError:
        return False


def _gather_errors(err: str | None) -> list[str]:
    """Every rank's error (None = fine); a collective when a process group exists."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [err] if err else []
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, err)
    return [e for e in out if e]


class Checkpointer:
    def __init__(self, root: str | Path, rank: int, keep: int = 2):
        self.root, self.rank, self.keep = Path(root), rank, keep

    def complete(self) -> list[Path]:
        """Directories with a COMPLETE marker, oldest first."""
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and (p / MARKER).exists())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, state: dict, meta: dict) -> float:
        """``state``: DCP-able nested dict (state_dicts); ``meta``: JSON-able trainer state."""
        t0 = time.time()
        final = self.root / f"step_{step:09d}"
        tmp = self.root / f"step_{step:09d}.partial"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        err = None
        try:
            dcp.save(state, checkpoint_id=str(tmp))
            torch.save(_rng_state(), tmp / f"rng_rank{self.rank}.pt")
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException; every rank joins the verdict
            err = self._describe_failure(e, tmp)
        errors = _gather_errors(err)
        if not errors and self.rank == 0:
            try:
                (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
                shutil.rmtree(final, ignore_errors=True)
                marker = json.dumps({"step": step, "time": time.time(), "files": file_manifest(tmp)}, indent=1)
                tmp.rename(final)
                (final / MARKER).write_text(marker + "\n")
            except OSError as e:
                err = self._describe_failure(e, tmp if tmp.exists() else final)
                shutil.rmtree(final, ignore_errors=True)   # renamed but unmarked: never loadable anyway
        errors = errors or _gather_errors(err)
        if errors:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            barrier()
            prev = self.latest()
            raise CheckpointError(f"{errors[0]}; the partial checkpoint was removed; "
                                  + (f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint"))
        if self.rank == 0:
            self._prune()
        barrier()
        return time.time() - t0

    @staticmethod
    def _describe_failure(e: BaseException, where: Path) -> str:
        # torch's zip writer reports a full disk as "unexpected pos 704 vs 598": ask the file system too
        if _no_space(e) or _nearly_full(where):
            return f"checkpoint write failed: no space left on device (ENOSPC) under {where}"
        return f"checkpoint write failed under {where}: {type(e).__name__}: {e}"

    def load(self, path: Path, state: dict) -> dict:
        """Fills ``state`` in place (DCP resharding); returns the trainer meta; restores RNG if present.
        Verifies the files first; raises CheckpointError (or UnsafeCheckpointError) naming the bad file."""
        bad = self._verify_everywhere(path)
        if bad:
            raise CheckpointError(f"checkpoint {path} failed verification: {bad}")
        reader = SafeFileSystemReader(str(path))
        reader.read_metadata()   # here, not only inside dcp.load, which would bury our message in its own
        dcp.load(state, storage_reader=reader)
        rng = path / f"rng_rank{self.rank}.pt"
        if rng.exists():  # absent when the world size grew: the caller reseeds
            _set_rng_state(torch.load(rng, weights_only=True))
        return json.loads((path / "trainer_state.json").read_text())

    def load_latest(self, state: dict) -> tuple[Path, dict] | None:
        """Load the newest complete checkpoint that verifies and reads; older ones are the fallback.
        None when there is no complete checkpoint at all; CheckpointError when none is usable."""
        done = self.complete()
        if not done:
            return None
        reasons = []
        for path in reversed(done):
            try:
                return path, self.load(path, state)
            except (Exception, CheckpointException) as e:   # verification, unsafe metadata, DCP read errors
                reason = str(e) if isinstance(e, CheckpointError) else f"{path}: {type(e).__name__}: {e}"
                reasons.append(reason)
                log.error("checkpoint %s is not usable (%s); trying the previous one", path.name, reason)
        raise CheckpointError(f"no usable checkpoint in {self.root}: " + "; ".join(reasons)
                              + ". Restore the files, or start fresh with --checkpoint.resume=false")

    def _verify_everywhere(self, path: Path) -> str | None:
        """Rank 0 reads and hashes the files (once per job, not once per rank); every rank gets the verdict."""
        verdict = verify(path) if self.rank == 0 else None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [verdict]
            dist.broadcast_object_list(box, src=0)
            verdict = box[0]
        return verdict

    def _prune(self) -> None:
        done = self.complete()
        for old in done[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)


def _rng_state() -> dict:
    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])

