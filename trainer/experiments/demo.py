"""``tailrec demo``: the main job on the embedded default dataset.

Generates a small long-tail dataset in the real raw MovieLens-1M format, converts it to Parquet (+
statistics), prints its long-tail profile, then trains DeepFM on ``nproc`` ranks (torchrun, gloo on
CPU / NCCL on GPU) and prints test AUC overall and per head/torso/tail bucket.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from trainer import launch

DEMO_CONFIG = launch.REPO / "configs" / "movielens_deepfm.yaml"


def prepare_dataset(out: Path, rows: int, seed: int = 0) -> Path:
    from data.convert import convert_movielens
    from data.generate import generate_movielens
    from data.stats import format_stats

    raw, ds = out / "raw", out / "dataset"
    if not (ds / "manifest.json").exists():
        generate_movielens(raw, rows=rows, seed=seed)
        convert_movielens(raw, ds)
    print(format_stats(ds))
    return ds


def run_demo(out: str, rows: int, nproc: int, overrides: list[str]) -> int:
    """Trains from scratch every time (``--checkpoint.resume=false``): the demo shows a run, it does
    not continue the previous one (which would be refused as already finished)."""
    out_p = Path(out)
    ds = prepare_dataset(out_p, rows)
    cmd = launch.trainer_command("train", DEMO_CONFIG, [f"--data.path={ds}", f"--run_dir={out_p / 'train'}",
                                                        "--checkpoint.resume=false", *overrides], nproc=nproc)
    print("+", launch.shown(cmd), flush=True)
    return subprocess.call(cmd, env=launch.subprocess_env())
