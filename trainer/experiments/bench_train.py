"""``tailrec bench train``: end-to-end training speed and memory of the real trainer, DeepFM and DLRM,
1 and 2 ranks, every embedding optimizer (FBGEMM's fused ones and our cfsgd) side by side in one run.

    tailrec bench train [--rows 300000 --steps 40 --warmup 5 --models deepfm,dlrm --ranks 1,2 ...]

Or any configuration on any converted dataset, compared variant by variant (for example what the
transfer costs per step at the demo's batch size):

    tailrec bench train --config configs/movielens_deepfm.yaml --data runs/demo/dataset --ranks 2 \
        --batch 1024 --rounds 5 --variant "cfsgd: --transfer.mode=baseline" --variant "both: --transfer.mode=both"

Data: a Kaggle-layout ``train.txt`` from ``data.generate.generate_criteo`` (26 categorical fields with
long-tail ids), converted in hash mode (every table ``hash_size + 1`` rows; statistics pass off).

Each configuration is one fresh process tree: ``python -m trainer.experiments.bench_train --worker ...`` (1 rank) or
``torchrun --nproc_per_node 2 -m trainer.experiments.bench_train --worker ...`` (gloo). The worker runs the real
``trainer.train.run`` on ``configs/criteo_<model>.yaml`` + overrides; the only difference from
``tailrec train`` is the metrics sink: a recorder (``trainer.metrics.NullMetrics`` subclass) that keeps
each training step's wall time (the trainer's own ``on_step`` timing, data wait included). So:

* ms/step: mean step time of rank 0 over the steps after ``--warmup`` (pipeline fill, lazy inits and
  first-touch allocation excluded); the trainer's own ``results.json`` number (all steps) is shown too;
* examples/s: ``batch * ranks / (ms/step)`` (global);
* peak RSS: each rank's own ``ru_maxrss`` (RUSAGE_SELF) at the end of the run, i.e. including the final
  evaluation and checkpoint, not only the timed steps;
* optimizer-state bytes: ``state_bytes_per_row`` (FBGEMM formula, ``trainer.optim.fbgemm``; our kernel's
  rule config for cfsgd) x ``num_embeddings`` summed over the 26 tables, and, as a cross-check, what the
  run's final DCP checkpoint actually holds under ``fused_optim.state`` (from its metadata).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from trainer import launch
from trainer.metrics import NullMetrics

REPO = launch.REPO
MODELS = ("deepfm", "dlrm")
OPTIMIZERS = ("exact_sgd", "exact_adagrad", "exact_rowwise_adagrad", "counter_sgd", "cfsgd")


# ---------------------------------------------------------------- worker (one rank of one configuration)

class StepRecorder(NullMetrics):
    """Metrics sink that records each training step's wall time and the process's CPU time (seconds)."""

    def __init__(self) -> None:
        self.step_seconds: List[float] = []
        self.cpu_seconds: List[float] = []    # process CPU time (all threads) at the end of each step

    def on_step(self, examples, step_seconds, data_wait_seconds, loss, lr=None) -> None:
        self.step_seconds.append(float(step_seconds))
        self.cpu_seconds.append(time.process_time())


def _worker(argv: List[str]) -> int:
    """``--worker OUT_DIR --config C [overrides]``: run the trainer, write OUT_DIR/rank<r>.json."""
    out_dir, rest = Path(argv[0]), argv[1:]
    p = argparse.ArgumentParser(prog="trainer.experiments.bench_train --worker")
    p.add_argument("--config", required=True)
    a, overrides = p.parse_known_args(rest)
    import trainer.train as train_mod
    from trainer.config import load_config

    rec = StepRecorder()
    train_mod._make_metrics = lambda cfg, env: rec   # the real trainer, our metrics sink
    res = train_mod.run(load_config(a.config, overrides))
    rank = int(os.environ.get("RANK", 0))
    out = {"rank": rank, "step_seconds": rec.step_seconds, "cpu_seconds": rec.cpu_seconds,
           "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           "results": {k: res[k] for k in ("steps", "train_seconds", "ms_per_step", "examples_per_second",
                                           "world_size")}}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    return 0


# ---------------------------------------------------------------- driver


def prepare_dataset(work: Path, rows: int, hash_size: int, seed: int, eval_frac: float = 0.01) -> tuple[Path, dict]:
    """Generate + convert (hash mode, no stats, ``eval_frac`` of the rows each to valid and test: the
    trainer's final evaluation is not timed but costs wall time); reuse a dataset converted the same way."""
    from data.convert import CriteoOptions, convert_criteo
    from data.generate import generate_criteo
    from data.manifest import load_manifest

    ds = work / f"criteo-{rows}-h{hash_size}-s{seed}-e{eval_frac:g}"
    info: dict = {"rows": rows, "hash_size": hash_size, "seed": seed}
    if (ds / "manifest.json").is_file():
        info["reused"] = True
    else:
        raw = work / f"raw-{rows}-s{seed}" / "train.txt"
        info["generate_s"] = generate_criteo(raw, rows, seed=seed)["seconds"]
        t = time.perf_counter()
        convert_criteo([raw], ds, CriteoOptions(mode="hash", hash_size=hash_size, stats=False, overwrite=True,
                                                  fractions=(1 - 2 * eval_frac, eval_frac, eval_frac)))
        info["convert_s"] = time.perf_counter() - t
        shutil.rmtree(raw.parent, ignore_errors=True)
    m = load_manifest(ds)
    info["train_rows"] = m.splits["train"].rows
    info["tables"] = {f.name: f.num_embeddings for f in m.sparse_features}
    return ds, info


def trainer_command(model: str, ranks: int, optimizer: str, dataset: Path, run_dir: Path, out_dir: Path,
                    a: argparse.Namespace, variant: List[str] | None = None) -> List[str]:
    """One configuration: an optimizer of the Criteo grid, or (``variant`` given) a variant's overrides
    on ``--config`` (later overrides win: the variant's go last)."""
    config = a.config or str(REPO / "configs" / f"criteo_{model}.yaml")
    own = [f"--embedding.optimizer.name={optimizer}", '--data.bucket_feature=""'] if variant is None else variant
    return launch.command([
        "--worker", str(out_dir), "--config", config,
        f"--data.path={dataset}", f"--run_dir={run_dir}", f"--data.batch_size={a.batch}",
        f"--data.eval_batch_size={a.eval_batch}", "--train.epochs=1",
        f"--train.max_steps={a.steps}", f"--train.device={a.device}", f"--train.log_every={10**9}",
        "--checkpoint.resume=false", *a.override, *own,
    ], nproc=ranks, module="trainer.experiments.bench_train")


def state_bytes(optimizer: str, dim: int) -> int:
    """Bytes of optimizer state per embedding row (FBGEMM's fp32 state; our rule's own state)."""
    from trainer.experiments.bench_kernel import _state_bytes

    return _state_bytes(dict(name=optimizer), dim)


def checkpoint_state_bytes(run_dir: Path) -> Dict[str, int]:
    """Per table: bytes under ``fused_optim.state`` in the run's last checkpoint (DCP metadata, global)."""
    import torch.distributed.checkpoint as dcp

    ck = sorted((run_dir / "checkpoints").glob("step_*"))
    if not ck:
        return {}
    md = dcp.FileSystemReader(str(ck[-1])).read_metadata()
    out: Dict[str, int] = {}
    for key, m in md.state_dict_metadata.items():
        if not key.startswith("fused_optim.state.") or not hasattr(m, "size"):
            continue
        table = key.split("embedding_bags.")[1].split(".")[0]
        numel = 1
        for s in m.size:
            numel *= s
        out[table] = out.get(table, 0) + numel * m.properties.dtype.itemsize
    return out


def run_config(model: str, ranks: int, optimizer: str, dataset: Path, work: Path, a,
               variant: List[str] | None = None) -> dict:
    """``optimizer`` is the row's label: an optimizer name, or a variant's label with its ``variant``
    overrides."""
    run_dir, out_dir = work / f"run-{model}-{ranks}-{optimizer}", work / f"out-{model}-{ranks}-{optimizer}"
    for d in (run_dir, out_dir):
        shutil.rmtree(d, ignore_errors=True)
    out_dir.mkdir(parents=True)
    cmd = trainer_command(model, ranks, optimizer, dataset, run_dir, out_dir, a, variant)
    env = launch.subprocess_env()
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=a.timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{model} x{ranks} {optimizer} failed ({proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(ranks)]
    steps = per_rank[0]["step_seconds"]
    timed = steps[a.warmup:] if len(steps) > a.warmup else steps
    step_s = sum(timed) / len(timed)
    w = max(1, min(a.warmup, len(steps) - 1))   # CPU time is read at step ends: at least step 1 left out
    cpu_ms = [1e3 * (r["cpu_seconds"][-1] - r["cpu_seconds"][w - 1]) / max(1, len(steps) - w) for r in per_rank]
    res = {"model": model, "ranks": ranks, "optimizer": optimizer, "wall_s": wall,
           "steps": len(steps), "timed_steps": len(timed), "ms_per_step": 1e3 * step_s,
           "examples_per_s": a.batch * ranks / step_s,
           "ms_per_step_all": per_rank[0]["results"]["ms_per_step"],
           "cpu_ms_per_step": sum(cpu_ms) / len(cpu_ms),
           "peak_rss_mib": [r["max_rss_kib"] / 1024 for r in per_rank],
           "checkpoint_state_bytes": checkpoint_state_bytes(run_dir)}
    if not a.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return res


def _median_round(rs: List[dict]) -> dict:
    """The round with the median ms/step (its RSS and checkpoint come with it); all rounds' ms/step kept."""
    order = [r["ms_per_step"] for r in rs]
    rs = sorted(rs, key=lambda r: r["ms_per_step"])
    return dict(rs[(len(rs) - 1) // 2], rounds_ms_per_step=[r["ms_per_step"] for r in rs], rounds_in_order=order)


def format_variants(results: List[dict]) -> str:
    """Variant mode: ms/step side by side, and each variant's cost over the first (the control), per
    round (rounds are interleaved, so round i of every variant ran under similar load)."""
    ctrl = results[0]
    lines = [f"| variant | ranks | ms/step (median round) | examples/s | vs `{ctrl['optimizer']}` (median of "
             "per-round ratios) | per-round ratios | ms/step of each round (run order) | peak RSS/rank MiB |",
             "|---|---:|---:|---:|---:|---|---|---:|"]
    for r in results:
        ratios = [x / c for x, c in zip(r["rounds_in_order"], ctrl["rounds_in_order"])]
        med = sorted(ratios)[(len(ratios) - 1) // 2]
        lines.append(f"| {r['optimizer']} | {r['ranks']} | {r['ms_per_step']:,.1f} | {r['examples_per_s']:,.0f} "
                     f"| {100 * (med - 1):+.1f}% | {', '.join(f'{x:.2f}' for x in ratios)} "
                     f"| {', '.join(f'{x:,.1f}' for x in r['rounds_in_order'])} "
                     f"| {' / '.join(f'{x:,.0f}' for x in r['peak_rss_mib'])} |")
    return "\n".join(lines)


def _dim(model: str, base_dim: int) -> int:
    from models import table_dim

    return table_dim(model, base_dim)


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def format_tables(results: List[dict], tables: Dict[str, int], base_dim: int) -> str:
    lines = ["| model | ranks | optimizer | ms/step | examples/s | peak RSS/rank MiB | opt-state MiB "
             "(formula) | opt-state MiB (checkpoint) | ms/step incl. warm-up | ms/step of each round "
             "| CPU ms/step/rank |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        dim = _dim(r["model"], base_dim)
        formula = sum(n * state_bytes(r["optimizer"], dim) for n in tables.values())
        ck = sum(r["checkpoint_state_bytes"].values())
        lines.append(f"| {r['model']} | {r['ranks']} | {r['optimizer']} | {r['ms_per_step']:,.1f} "
                     f"| {r['examples_per_s']:,.0f} | {' / '.join(f'{x:,.0f}' for x in r['peak_rss_mib'])} "
                     f"| {_mib(formula)} | {_mib(ck)} | {r['ms_per_step_all']:,.1f} "
                     f"| {', '.join(f'{x:,.0f}' for x in r.get('rounds_ms_per_step', [r['ms_per_step']]))} "
                     f"| {r.get('cpu_ms_per_step', float('nan')):,.0f} |")
    # per table, one representative case: the first model, every optimizer
    first = results[0]["model"]
    opts = list(dict.fromkeys(r["optimizer"] for r in results if r["model"] == first))
    ck_by_opt = {r["optimizer"]: r["checkpoint_state_bytes"] for r in results if r["model"] == first
                 and r["ranks"] == min(x["ranks"] for x in results)}
    dim = _dim(first, base_dim)
    lines += ["", f"Optimizer-state bytes per table ({first}, row width {dim} fp32; formula, "
              "checkpoint in parentheses when it differs):", "",
              "| table | rows | " + " | ".join(f"{o} ({state_bytes(o, dim)} B/row)" for o in opts) + " |",
              "|---|---:|" + "---:|" * len(opts)]
    tot = {o: [0, 0] for o in opts}
    for t, n in tables.items():
        cells = []
        for o in opts:
            f, c = n * state_bytes(o, dim), ck_by_opt.get(o, {}).get(t, 0)
            tot[o][0] += f
            tot[o][1] += c
            cells.append(f"{f:,}" + (f" ({c:,})" if c != f else ""))
        lines.append(f"| {t} | {n:,} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + f"{sum(tables.values()):,} | "
                 + " | ".join(f"{tot[o][0]:,}" + (f" ({tot[o][1]:,})" if tot[o][1] != tot[o][0] else "")
                              for o in opts) + " |")
    return "\n".join(lines)


def _args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tailrec bench train", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=360_000, help="raw rows generated (train: 1 - 2 * eval-frac)")
    p.add_argument("--hash-size", type=int, default=1 << 17, help="hash buckets per table (+1 for missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-frac", type=float, default=0.01, help="fraction of rows in valid and in test each")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=40, help="training steps per configuration (max_steps)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of ms/step")
    p.add_argument("--rounds", type=int, default=1, help="runs per configuration, optimizers interleaved; "
                   "the table shows the median round (lower median for an even count) and every round")
    p.add_argument("--batch", type=int, default=4096, help="per rank")
    p.add_argument("--eval-batch", type=int, default=16384)
    p.add_argument("--dim", type=int, default=16, help="embedding dim of the configs (for the state formula)")
    p.add_argument("--work", help="keep the dataset (reused next time) and run dirs here; default: a temp dir")
    p.add_argument("--keep", action="store_true", help="keep run directories (checkpoints)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--override", action="append", default=[], help="extra trainer override, e.g. "
                   "--override=--train.pipeline=false (repeatable)")
    p.add_argument("--device", default="cpu", help="train.device of every run (cpu | cuda | auto)")
    p.add_argument("--config", help="variant mode: this config instead of configs/criteo_<model>.yaml")
    p.add_argument("--data", help="variant mode: a converted dataset (nothing generated)")
    p.add_argument("--variant", action="append", default=[], help="variant mode: 'label: --a.b=c ...' "
                   "(repeatable; the first is the control); needs --config and --data")
    return p.parse_args(argv)


def main(argv: List[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker(argv[1:])
    a = _args(argv)
    if a.variant or a.config or a.data:
        return _main_variants(a)
    models, ranks = a.models.split(","), [int(r) for r in a.ranks.split(",")]
    opts = a.optimizers.split(",")
    bad = [m for m in models if m not in MODELS] + [o for o in opts if o not in OPTIMIZERS]
    if bad:
        print(f"tailrec bench train: unknown model/optimizer {bad}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tailrec-bench-train-") as tmp:
        work = Path(a.work) if a.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ds, info = prepare_dataset(work, a.rows, a.hash_size, a.seed, a.eval_frac)
        print(f"dataset: {info['rows']:,} raw rows -> {info['train_rows']:,} train, 26 tables x "
              f"{a.hash_size + 1:,} rows (hash), " + (f"generated {info['generate_s']:.0f}s, converted "
              f"{info['convert_s']:.0f}s" if "convert_s" in info else "reused"), flush=True)
        results = []
        for model in models:
            for r in ranks:
                rounds: Dict[str, List[dict]] = {o: [] for o in opts}
                for i in range(a.rounds):   # optimizers innermost and interleaved: same machine load
                    for o in opts:
                        res = run_config(model, r, o, ds, work, a)
                        rounds[o].append(res)
                        if res["steps"] < a.steps:
                            print(f"  warning: epoch ended after {res['steps']} of {a.steps} steps; raise --rows",
                                  flush=True)
                        print(f"  {model} x{r} {o} (round {i + 1}): {res['ms_per_step']:.1f} ms/step, "
                              f"{res['examples_per_s']:,.0f} ex/s ({res['wall_s']:.0f}s wall)", flush=True)
                results += [_median_round(rounds[o]) for o in opts]
    table = format_tables(results, info["tables"], a.dim)
    print(f"\nbatch {a.batch}/rank, {a.steps} steps per run, ms/step = mean of steps {a.warmup + 1}..{a.steps} "
          f"(rank 0), {a.rounds} round(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"total {time.perf_counter() - t0:.0f}s\n")
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps({"dataset": info, "results": results, "args": vars(a)}, indent=2) + "\n")
    return 0


def _main_variants(a: argparse.Namespace) -> int:
    from trainer.experiments.compare import parse_variant

    if not (a.variant and a.config and a.data):
        print("tailrec bench train: --variant, --config and --data go together", file=sys.stderr)
        return 2
    try:
        variants = [parse_variant(v) for v in a.variant]
    except ValueError as e:
        print(f"tailrec bench train: {e}", file=sys.stderr)
        return 2
    dataset = Path(a.data).resolve()
    if not (dataset / "manifest.json").is_file():
        print(f"tailrec bench train: {dataset}: no manifest.json (convert the data first)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="tailrec-bench-train-") as tmp:
        work = Path(a.work) if a.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for r in [int(x) for x in a.ranks.split(",")]:
            rounds: Dict[str, List[dict]] = {label: [] for label, _ in variants}
            for i in range(a.rounds):   # variants innermost and interleaved: same machine load
                for label, args in variants:
                    res = run_config("variant", r, label, dataset, work, a, list(args))
                    rounds[label].append(res)
                    if res["steps"] < a.steps:
                        print(f"  warning: epoch ended after {res['steps']} of {a.steps} steps", flush=True)
                    print(f"  x{r} {label} (round {i + 1}): {res['ms_per_step']:.1f} ms/step "
                          f"({res['wall_s']:.0f}s wall)", flush=True)
            results += [_median_round(rounds[label]) for label, _ in variants]
    last = min(min(x["steps"] for x in results), a.steps)   # an epoch may end first
    print(f"\n{a.config} on {a.data}: batch {a.batch}/rank, {last} steps per run, ms/step = mean of steps "
          f"{a.warmup + 1}..{last} (rank 0), {a.rounds} interleaved round(s), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, total {time.perf_counter() - t0:.0f}s\n")
    for r in sorted({x["ranks"] for x in results}):
        print(format_variants([x for x in results if x["ranks"] == r]) + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "args": vars(a)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
