"""Checkpoints with torch.distributed.checkpoint (DCP): sharded weights, fused optimizer state
(counters, step), dense optimizer, trainer/loader position, per-rank RNG and the config.

A checkpoint is written to ``step_XXXXXXXXX.partial/`` and renamed only after every rank finished,
then marked ``COMPLETE``: a crash mid-save never leaves a directory that ``latest()`` would pick.
DCP reshards on load, so a checkpoint saved with 2 ranks loads with 1 and the reverse.
Nothing here unpickles arbitrary objects: DCP metadata is tensors + plain types, RNG files are loaded
with ``weights_only=True`` and trainer state is JSON.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from trainer.dist import barrier

MARKER = "COMPLETE"


class Checkpointer:
    def __init__(self, root: str | Path, rank: int, keep: int = 2):
        self.root, self.rank, self.keep = Path(root), rank, keep

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and (p / MARKER).exists())
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
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng_rank{self.rank}.pt")
        barrier()
        if self.rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            (final / MARKER).write_text(f"{time.time()}\n")
            self._prune()
        barrier()
        return time.time() - t0

    def load(self, path: Path, state: dict) -> dict:
        """Fills ``state`` in place (DCP resharding); returns the trainer meta; restores RNG if present."""
        dcp.load(state, checkpoint_id=str(path))
        rng = path / f"rng_rank{self.rank}.pt"
        if rng.exists():  # absent when the world size grew: the caller reseeds
            _set_rng_state(torch.load(rng, weights_only=True))
        return json.loads((path / "trainer_state.json").read_text())

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and (p / MARKER).exists())
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

