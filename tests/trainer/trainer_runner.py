"""Run the real trainer (1 rank, or a torchrun job on gloo) from tests, and read its results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from trainer.dist import free_port

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "movielens_deepfm.yaml"


def run_trainer(run_dir: Path, dataset: Path, nproc: int, *overrides: str, command: str = "train",
                timeout: int = 240) -> subprocess.CompletedProcess:
    """A real trainer process (1 rank) or a real torchrun job (gloo) with the given overrides."""
    head = [sys.executable, "-m"]
    if nproc > 1:
        head += ["torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                 f"--master_port={free_port()}", "-m"]
    args = ["trainer", command]
    if command == "train":
        args += ["--config", str(CONFIG), f"--data.path={dataset}", f"--run_dir={run_dir}",
                 "--data.batch_size=256", "--data.eval_batch_size=1024", "--train.log_every=1000"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(head + args + list(overrides), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())
