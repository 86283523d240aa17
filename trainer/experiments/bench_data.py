"""``tailrec bench data``: Criteo conversion next to a parse-only pyarrow.csv read of the same file,
worker scaling, peak RSS as the input grows, loader next to a bare Parquet decode; one run, side by side.

* Speed (``--speed-rows`` raw rows, ``--rounds`` interleaved rounds, median and range): in child
  processes, (a) ``pyarrow.csv.open_csv`` alone over the file with the converter's reader settings
  (every column a string, no quoting, one thread) and with pyarrow's defaults (tab-separated, types
  inferred, one thread); (b) ``convert_criteo`` in hash and vocab mode with 1 and 2 workers
  (statistics pass off). Rates per CPU-second count the child and its workers (``RUSAGE_CHILDREN``).
* Memory (``--sizes``): one hash conversion per size, peak RSS of the conversion process and of its
  largest worker: ``VmHWM`` of each process of the child's tree, sampled every 20 ms from ``/proc``.
  (``ru_maxrss`` would not do: a child started by fork + exec reports at least its parent's RSS at the
  fork, and RUSAGE_CHILDREN keeps the maximum over all children ever waited for.)
* Loader: one epoch of ``ParquetLoader`` (shuffled, prefetch 4) per rank, 1 rank and each rank of 2
  one after the other, next to ``pq.ParquetFile.iter_batches`` over the same train files; rounds
  interleaved, median.
* Criteo 1TB (4.37e9 rows, 24 day files) extrapolated from the measured per-core rates.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from data.loader import ParquetLoader
from data.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]
TB_ROWS, TB_DAYS = 4_373_472_329, 24          # Criteo 1TB click logs: rows over day_0 .. day_23

_CHILD_CONVERT = r"""
import json, resource, sys, time
from data.convert import CriteoOptions, convert_criteo
def cpu():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
if __name__ == "__main__":
    src, out, mode, workers = sys.argv[1:5]
    t, c = time.perf_counter(), cpu()       # imports and interpreter start-up are not counted
    m = convert_criteo([src], out, CriteoOptions(mode=mode, workers=int(workers), stats=False, overwrite=True,
                                                 progress=False))
    print(json.dumps({"seconds": time.perf_counter() - t, "cpu": cpu() - c,
                      "rows": sum(s.rows for s in m.splits.values()) + m.rejects["count"],
                      "row_path_lines": m.source["engine"]["row_path_lines"]}))
"""

_CHILD_PARSE = r"""
import json, sys, time
import pyarrow.csv as pcsv
from data.convert.criteo_format import COLUMNS
from data.convert.criteo_vec import CSV_CONVERT, csv_parse_options
src, kind = sys.argv[1:3]
ro = pcsv.ReadOptions(column_names=COLUMNS, use_threads=False, block_size=4 << 20)
t, c = time.perf_counter(), time.process_time()
if kind == "converter":
    reader = pcsv.open_csv(src, read_options=ro, parse_options=csv_parse_options(), convert_options=CSV_CONVERT)
else:
    reader = pcsv.open_csv(src, read_options=ro, parse_options=pcsv.ParseOptions(delimiter="\t"))
rows = sum(b.num_rows for b in reader)
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": time.process_time() - c, "rows": rows}))
"""


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


class _PeakRss(threading.Thread):
    """Samples ``VmHWM`` (peak RSS) of a process and its descendants until it exits."""

    def __init__(self, proc: subprocess.Popen):
        super().__init__(daemon=True)
        self.proc, self.peak = proc, {}

    def run(self) -> None:
        while self.proc.poll() is None:
            for p in _tree(self.proc.pid):
                self.peak[p] = max(self.peak.get(p, 0), _vm_hwm_kib(p))
            time.sleep(0.02)

    def result(self) -> tuple[float, float]:
        main = self.peak.get(self.proc.pid, 0) / 1024
        workers = [v / 1024 for p, v in self.peak.items() if p != self.proc.pid]
        return main, max(workers, default=0.0)


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sampler = _PeakRss(proc)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {args} failed:\n{stderr[-3000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    rss, worker_rss = sampler.result()
    return r | {"rows_per_s": r["rows"] / r["seconds"], "rows_per_cpu_s": r["rows"] / r["cpu"],
                "rss_mib": rss, "worker_rss_mib": worker_rss}


def convert_in_child(src: Path, out: Path, mode: str = "hash", workers: int = 1) -> dict:
    return _child(_CHILD_CONVERT, str(src), str(out), mode, str(workers))


def parse_in_child(src: Path, kind: str = "converter") -> dict:
    return _child(_CHILD_PARSE, str(src), kind)


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# ----------------------------------------------------------------------------- conversion speed

SPEED_RUNS = [("parse", "converter", 1), ("parse", "default", 1), ("hash", "", 1), ("vocab", "", 1),
              ("hash", "", 2), ("vocab", "", 2)]


def bench_speed(raw: Path, work: Path, rounds: int) -> dict:
    """Every configuration once per round, rounds interleaved (the machine is shared)."""
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for what, kind, w in SPEED_RUNS:
            key = f"parse:{kind}" if what == "parse" else f"{what}:w{w}"
            r = parse_in_child(raw, kind) if what == "parse" else convert_in_child(raw, work / f"ds-{key}", what, w)
            runs.setdefault(key, []).append(r)
    out = {}
    for key, rs in runs.items():
        out[key] = {"rows": rs[0]["rows"], "rows_per_s": _stats([r["rows_per_s"] for r in rs]),
                    "rows_per_cpu_s": _stats([r["rows_per_cpu_s"] for r in rs])}
    for mode in ("hash", "vocab"):       # speed-up per round (paired), then the median
        pairs = [b["rows_per_s"] / a["rows_per_s"] for a, b in zip(runs[f"{mode}:w1"], runs[f"{mode}:w2"])]
        out[f"{mode}:w2"]["speedup"] = _stats(pairs)
    return out


def format_speed(s: dict) -> str:
    base = s["parse:converter"]["rows_per_cpu_s"]["median"]
    base_default = s["parse:default"]["rows_per_cpu_s"]["median"]
    lines = ["| what | workers | rows/s wall, median [min-max] | rows per CPU-second | per core vs parse-only "
             "(converter settings / pyarrow defaults) | speed-up vs 1 worker |", "|---|---:|---:|---:|---:|---:|"]
    for key, r in s.items():
        what, w = (key, "1") if key.startswith("parse") else (key.split(":")[0], key.split(":w")[1])
        wall, cpu = r["rows_per_s"], r["rows_per_cpu_s"]["median"]
        ratio = "" if key.startswith("parse") else f"{cpu / base:.2f}x / {cpu / base_default:.2f}x"
        sp = f"{r['speedup']['median']:.2f}x [{r['speedup']['min']:.2f}-{r['speedup']['max']:.2f}]" \
            if "speedup" in r else ""
        label = {"parse:converter": "pyarrow.csv parse only, converter settings",
                 "parse:default": "pyarrow.csv parse only, defaults (types inferred)"}.get(key, f"convert, {what} mode")
        lines.append(f"| {label} | {w} | {wall['median']:,.0f} [{wall['min']:,.0f}-{wall['max']:,.0f}] "
                     f"| {cpu:,.0f} | {ratio} | {sp} |")
    return "\n".join(lines)


def gunzip_rate(raw: Path, sample_bytes: int = 64 << 20) -> float:
    """Lines per CPU-second of ``gzip`` decompression (the Criteo 1TB files are ``.gz``): a sample of the
    raw file is compressed in memory (level 6, as ``gzip``), then decompressed."""
    import gzip
    import io
    with open(raw, "rb") as f:
        data = f.read(sample_bytes)
    packed = gzip.compress(data, compresslevel=6, mtime=0)
    c = time.process_time()
    with gzip.open(io.BytesIO(packed)) as g:
        while g.read1(1 << 20):
            pass
    return data.count(b"\n") / (time.process_time() - c)


def extrapolate_1tb(s: dict, gunzip: float, cores: int = 16) -> str:
    """Hours for Criteo 1TB on ``cores`` cores from the measured per-core rates.

    Parallel efficiency: CPU-seconds per row with 1 worker over those with 2 (what the extra
    processes cost; tasks share nothing else), and, next to it, the wall-clock 2-worker speed-up / 2
    measured on this machine (only meaningful when it had a second core free)."""
    lines = []
    days = -(-TB_DAYS // cores)                  # rounds of one .gz file per core
    for mode, passes in (("hash", 1), ("vocab", 2)):
        per_core = s[f"{mode}:w1"]["rows_per_cpu_s"]["median"]
        cpu_eff = min(1.0, s[f"{mode}:w2"]["rows_per_cpu_s"]["median"] / per_core)
        wall_eff = min(1.0, s[f"{mode}:w2"]["speedup"]["median"] / 2)
        plain = [TB_ROWS / (per_core * cores * e) / 3600 for e in (cpu_eff, wall_eff)]
        gz_core = 1 / (1 / per_core + passes / gunzip)                 # every pass decompresses again
        gz_h = days * TB_ROWS / TB_DAYS / gz_core / 3600
        lines.append(f"- {mode}: {per_core:,.0f} rows per core-second; over plain day files (byte ranges keep "
                     f"{cores} cores busy): {plain[0]:.2f} h at the CPU efficiency of 2 workers ({cpu_eff:.2f}), "
                     f"{plain[1]:.2f} h at the wall-clock one measured here ({wall_eff:.2f}); over the 24 .gz "
                     f"files (one task per file: {days} rounds on {cores} cores, {passes} gunzip pass(es) at "
                     f"{gunzip:,.0f} lines per CPU-second): {gz_h:.2f} h")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- memory vs size

def bench_memory(raws: dict[int, Path], work: Path, workers: int) -> list[dict]:
    out = []
    for rows, raw in raws.items():
        r = convert_in_child(raw, work / f"ds-mem-{rows}", "hash", workers)
        out.append({"rows": rows, "raw_mib": raw.stat().st_size / 2**20, "rows_per_s": r["rows_per_s"],
                    "rss_mib": r["rss_mib"], "worker_rss_mib": r["worker_rss_mib"], "workers": workers})
    return out


def format_memory(rows: list[dict]) -> str:
    lines = ["| raw rows | raw MiB | workers | convert rows/s | peak RSS MiB, main process | peak RSS MiB, largest worker |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        worker = f"{r['worker_rss_mib']:,.0f}" if r["worker_rss_mib"] else "- (one task: no worker)"
        lines.append(f"| {r['rows']:,} | {r['raw_mib']:,.0f} | {r['workers']} | {r['rows_per_s']:,.0f} "
                     f"| {r['rss_mib']:,.0f} | {worker} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- loader vs decode

def plain_read(dataset_dir: Path, batch_size: int, repeats: int = 2) -> dict:
    """The floor: decode the same train files with iter_batches, no tensors, no shuffle (median of repeats)."""
    files = [dataset_dir / rel for rel in load_manifest(dataset_dir).splits["train"].files]

    def run() -> float:
        t, n = time.perf_counter(), 0
        for path in files:
            with pq.ParquetFile(path) as pf:
                n += sum(1 for _ in pf.iter_batches(batch_size=batch_size))
        return n / (time.perf_counter() - t)

    rate = statistics.median(run() for _ in range(repeats))
    return {"batches_per_s": rate, "rows_per_s": rate * batch_size}


def loader_read(dataset_dir: Path, batch_size: int, world: int, repeats: int = 2) -> dict:
    """One shuffled epoch per rank (prefetch 4), ranks one after another; mean per-rank rate (median of repeats)."""
    warm = iter(ParquetLoader(dataset_dir, "train", batch_size))   # first-use costs (lazy inits)
    next(warm, None)
    del warm
    rates, loader = [], None
    for rank in range(world):
        loader = ParquetLoader(dataset_dir, "train", batch_size, rank=rank, world_size=world)

        def run() -> float:
            t = time.perf_counter()
            n = sum(1 for _ in loader)
            return n / (time.perf_counter() - t)

        rates.append(statistics.median(run() for _ in range(repeats)))
    per_rank = sum(rates) / world
    return {"batches_per_s": per_rank, "rows_per_s": per_rank * batch_size, "batches_per_rank": len(loader)}


def bench_loader(ds: Path, batch_size: int, rounds: int) -> dict:
    runs = {"plain": [], 1: [], 2: []}
    for _ in range(rounds):
        runs["plain"].append(plain_read(ds, batch_size, 1)["batches_per_s"])
        for w in (1, 2):
            runs[w].append(loader_read(ds, batch_size, w, 1)["batches_per_s"])
    out = {k: _stats(v) for k, v in runs.items()}
    for w in (1, 2):
        out[f"ratio_{w}"] = _stats([a / b for a, b in zip(runs[w], runs["plain"])])
    return out


def format_loader(r: dict, batch_size: int, train_rows: int) -> str:
    lines = [f"| reader ({train_rows:,} train rows, batch {batch_size}) | batches/s per rank, median [min-max] "
             "| vs bare decode (paired per round) |", "|---|---:|---:|"]
    for key, label in (("plain", "bare `iter_batches` decode, no shuffle, no tensors"),
                       (1, "ParquetLoader, 1 rank, shuffle on"), (2, "ParquetLoader, 2 ranks, shuffle on (per rank)")):
        s = r[key]
        ratio = "" if key == "plain" else f"{r[f'ratio_{key}']['median']:.2f}x"
        lines.append(f"| {label} | {s['median']:,.1f} [{s['min']:,.1f}-{s['max']:,.1f}] | {ratio} |")
    return "\n".join(lines)


def format_table(results: list[dict], batch_size: int) -> str:
    """One row per size: conversion and loader numbers of ``bench_size``-style dicts."""
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


# ----------------------------------------------------------------------------- driver

def _raw(work: Path, rows: int, seed: int) -> Path:
    from data.generate import generate_criteo
    raw = work / f"raw-{rows}" / "train.txt"
    if not raw.is_file():                       # reused with --out: generating 10M rows takes minutes
        generate_criteo(raw, rows, seed=seed)
    return raw


def bench_data(out_dir=None, speed_rows: int = 1_000_000, sizes=(1_000_000, 3_000_000, 10_000_000),
               batch_size: int = 4096, rounds: int = 3, seed: int = 0, mem_workers: int = 1) -> dict:
    with tempfile.TemporaryDirectory(prefix="tailrec-bench-") as tmp:
        work = Path(out_dir) if out_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        raw = _raw(work, speed_rows, seed)
        speed = bench_speed(raw, work, rounds)
        gunzip = gunzip_rate(raw)
        ds = work / "ds-hash:w1"
        loader = bench_loader(ds, batch_size, rounds)
        train_rows = load_manifest(ds).splits["train"].rows
        memory = bench_memory({n: _raw(work, n, seed) for n in sizes}, work, mem_workers) if sizes else []
    tables = "\n\n".join([f"Conversion of {speed_rows:,} generated Criteo rows ({rounds} interleaved rounds):",
                          format_speed(speed), "Criteo 1TB extrapolated:", extrapolate_1tb(speed, gunzip),
                          "Loader vs bare decode:", format_loader(loader, batch_size, train_rows),
                          "Peak RSS as the input grows (hash mode):", format_memory(memory) if memory else "(skipped)"])
    return {"speed": speed, "gunzip_lines_per_cpu_s": gunzip, "loader": loader, "memory": memory,
            "batch_size": batch_size, "speed_rows": speed_rows,
            "load_average": os.getloadavg(), "table": tables}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tailrec bench data", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="keep raw and converted data here (default: a temporary dir)")
    p.add_argument("--speed-rows", type=int, default=1_000_000, help="raw rows of the speed and loader runs")
    p.add_argument("--sizes", default="1000000,3000000,10000000", help="raw row counts of the memory runs ('' = none)")
    p.add_argument("--mem-workers", type=int, default=1, help="workers of the memory runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the numbers to this file")
    a = p.parse_args(argv)
    sizes = tuple(int(s) for s in a.sizes.split(",") if s)
    res = bench_data(a.out, a.speed_rows, sizes, a.batch_size, a.rounds, a.seed, a.mem_workers)
    print(res["table"])
    if a.json:
        Path(a.json).write_text(json.dumps({k: v for k, v in res.items() if k != "table"}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
