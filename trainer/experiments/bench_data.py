"""``tailrec bench data``: Criteo conversion speed and memory, loader throughput vs a plain Parquet read.

For each size: generate a Kaggle-layout ``train.txt`` (``data.generate.generate_criteo``), convert it
in a child process (``convert_criteo``, vocab or hash mode, statistics pass off) that reports its own
peak RSS, then time one epoch of ``ParquetLoader`` (1 rank, and each rank of 2 simulated one after the
other in this process; best of 2 epochs, after a warm-up) next to ``pq.ParquetFile.iter_batches``
over the same train files.

Peak RSS is the child's own ``ru_maxrss``: ``RUSAGE_CHILDREN`` keeps the maximum over *all* waited
children, so a later, smaller conversion could never show a lower number.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from data.loader import ParquetLoader
from data.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
from data.convert import CriteoOptions, convert_criteo
t = time.perf_counter()
m = convert_criteo([sys.argv[1]], sys.argv[2], CriteoOptions(mode=sys.argv[3], stats=False, overwrite=True))
dt = time.perf_counter() - t
rows = sum(s.rows for s in m.splits.values()) + m.rejects.get("count", 0)
print(json.dumps({"seconds": dt, "rows": rows, "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def convert_in_child(src: Path, out: Path, mode: str = "vocab") -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), mode], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"conversion of {src} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"convert_rows_per_s": r["rows"] / r["seconds"], "convert_seconds": r["seconds"],
            "convert_peak_rss_mib": r["max_rss_kib"] / 1024}


def _best_rate(fn, repeats: int) -> float:
    """Best of ``repeats`` runs of ``fn() -> (count, seconds)``: the machine is shared, the max is the signal."""
    return max(n / dt for n, dt in (fn() for _ in range(repeats)))


def plain_read(dataset_dir: Path, batch_size: int, repeats: int = 2) -> dict:
    """The floor: decode the same train files with iter_batches, no tensors, no shuffle."""
    files = [dataset_dir / rel for rel in load_manifest(dataset_dir).splits["train"].files]

    def run():
        t, n = time.perf_counter(), 0
        for path in files:
            with pq.ParquetFile(path) as pf:
                n += sum(1 for _ in pf.iter_batches(batch_size=batch_size))
        return n, time.perf_counter() - t

    rate = _best_rate(run, repeats)
    return {"batches_per_s": rate, "rows_per_s": rate * batch_size}


def loader_read(dataset_dir: Path, batch_size: int, world: int, repeats: int = 2) -> dict:
    """One epoch per rank (shuffled, prefetch 4), ranks one after another; mean per-rank rate."""
    warm = iter(ParquetLoader(dataset_dir, "train", batch_size))   # first-use costs (lazy inits)
    next(warm, None)
    del warm
    rates = []
    for rank in range(world):
        loader = ParquetLoader(dataset_dir, "train", batch_size, rank=rank, world_size=world)

        def run():
            t = time.perf_counter()
            n = sum(1 for _ in loader)
            return n, time.perf_counter() - t

        rates.append(_best_rate(run, repeats))
    per_rank = sum(rates) / world
    return {"batches_per_s": per_rank, "rows_per_s": per_rank * batch_size, "batches_per_rank": len(loader)}


def bench_size(work: Path, rows: int, batch_size: int, seed: int, mode: str = "vocab") -> dict:
    from data.generate import generate_criteo
    raw, ds = work / f"raw-{rows}" / "train.txt", work / f"ds-{rows}"
    gen = generate_criteo(raw, rows, seed=seed)
    res = {"rows": rows, "generate_rows_per_s": gen["rows_per_s"], **convert_in_child(raw, ds, mode)}
    res["train_rows"] = load_manifest(ds).splits["train"].rows
    res["raw_mib"] = raw.stat().st_size / 2**20
    res["plain"] = plain_read(ds, batch_size)
    res["loader"] = {w: loader_read(ds, batch_size, w) for w in (1, 2)}
    return res


def bench_data(out_dir=None, sizes=(1_000_000, 3_000_000), batch_size: int = 4096, seed: int = 0,
               mode: str = "vocab") -> dict:
    """Run every size; returns ``{"sizes": [per-size dict], "batch_size": ..., "table": markdown}``."""
    with tempfile.TemporaryDirectory(prefix="tailrec-bench-") as tmp:
        work = Path(out_dir) if out_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = [bench_size(work, n, batch_size, seed, mode) for n in sizes]
    return {"sizes": results, "batch_size": batch_size, "mode": mode, "table": format_table(results, batch_size)}


def format_table(results: list[dict], batch_size: int) -> str:
    lines = ["| raw rows | generate rows/s | convert rows/s | convert peak RSS MiB | train rows "
             "| plain iter_batches batches/s | loader 1 rank batches/s | loader 2 ranks batches/s per rank |",
             "|" + "---:|" * 8]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['generate_rows_per_s']:,.0f} | {r['convert_rows_per_s']:,.0f} "
                     f"| {r['convert_peak_rss_mib']:,.0f} | {r['train_rows']:,} "
                     f"| {r['plain']['batches_per_s']:,.1f} | {r['loader'][1]['batches_per_s']:,.1f} "
                     f"| {r['loader'][2]['batches_per_s']:,.1f} |")
    lines.append(f"\nbatch size {batch_size}; loader rows/s = batches/s x {batch_size}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tailrec bench data", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="keep raw and converted data here (default: a temporary dir)")
    p.add_argument("--sizes", default="1000000,3000000", help="comma-separated raw row counts")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("vocab", "hash"), default="vocab", help="Criteo id mapping")
    p.add_argument("--json", help="also write the numbers to this file")
    a = p.parse_args(argv)
    sizes = tuple(int(s) for s in a.sizes.split(","))
    res = bench_data(a.out, sizes, a.batch_size, a.seed, a.mode)
    print(res["table"])
    if a.json:
        Path(a.json).write_text(json.dumps({k: v for k, v in res.items() if k != "table"}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
