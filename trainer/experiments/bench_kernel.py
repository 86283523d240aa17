"""Fused optimizer kernel benchmark: ms/step of a sharded EBC (forward + backward with the
fused update, input/output dist included) for our kernel vs FBGEMM's fused optimizers, on the
same data and plan, side by side in one run.

    torchrun --nproc_per_node {1,2} -m trainer.experiments.bench_kernel [--rows N --batch B ...]
    python -m trainer.experiments.bench_kernel            # one rank without torchrun
    python -m trainer.experiments.bench_kernel --device cuda   # GPUs (NCCL; our kernel runs Triton)

Ids are Zipf-like (log-uniform over the table: p(k) ~ 1/k), bag sizes uniform in [0, 2L).
Rounds of all variants are interleaved; the median shows typical cost, the best round the cost
with the least interference from other work on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

VARIANTS = {  # name -> (EmbOptimConfig kwargs, shadow features?, lexico on: None | "transfer" | "all")
    "cfsgd (ours)": (dict(name="cfsgd"), False, None),   # its default ub_mode="table"
    "cfsgd, ub_mode=fixed (ours)": (dict(name="cfsgd", ub_mode="fixed"), False, None),   # FBGEMM's fixed ub
    "cfsgd, 2-byte counter (ours)": (dict(name="cfsgd", counter_bytes=2), False, None),   # approximate counters
    "cfsgd, 1-byte counter (ours)": (dict(name="cfsgd", counter_bytes=1), False, None),
    "cfsgd + transfer, d = g + h (ours)": (dict(name="cfsgd"), True, None),
    "cfsgd + transfer + lexico (ours)": (dict(name="cfsgd"), True, "transfer"),
    "cfsgd + transfer + lexico on every table (ours)": (dict(name="cfsgd"), True, "all"),
    "fbgemm exact_sgd": (dict(name="exact_sgd"), False, None),
    "fbgemm exact_rowwise_adagrad": (dict(name="exact_rowwise_adagrad"), False, None),
    "fbgemm counter_sgd": (dict(name="counter_sgd"), False, None),
}
SHADOW_TABLES = 4  # tables that get a shadow (transfer) feature in the lexico variant


def _args(argv: List[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tailrec bench kernel")
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096, help="per rank")
    p.add_argument("--pooling", type=int, default=10, help="mean ids per bag")
    p.add_argument("--sharding", default="table_wise")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated substrings: run only the variants whose name has one "
                   "(fbgemm exact_sgd and the three lexico-comparison rows are always kept)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS steps (torch.profiler, self CPU time per op) of the transfer step with and "
                        "without lexico, and print where they differ")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: one GPU per rank (LOCAL_RANK), NCCL, our kernel's Triton path")
    return p.parse_args(argv)


class _Wrap(nn.Module):
    def __init__(self, tables):
        super().__init__()
        from torchrec import EmbeddingBagCollection

        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))

    def forward(self, kjt):
        return self.ebc(kjt)


def _tables(a, shadow: bool):
    from torchrec import EmbeddingBagConfig

    return [EmbeddingBagConfig(num_embeddings=a.rows, embedding_dim=a.dim, name=f"t{i}",
                               feature_names=[f"f{i}"] + ([f"f{i}__shadow"] if shadow and i < SHADOW_TABLES else []))
            for i in range(a.tables)]


def _batches(a, rank: int, shadow: bool, device: torch.device, n: int = 4):
    from torchrec import KeyedJaggedTensor

    out = []
    for s in range(n):
        g = torch.Generator().manual_seed(1000 * s + rank)
        keys, lengths, values = [], [], []
        for i in range(a.tables):
            ln = torch.randint(0, 2 * a.pooling, (a.batch,), generator=g)
            v = (a.rows ** torch.rand(int(ln.sum()), generator=g)).long().clamp_max(a.rows - 1)
            feats = [f"f{i}"] + ([f"f{i}__shadow"] if shadow and i < SHADOW_TABLES else [])
            for f in feats:  # the shadow lookup repeats the batch's ids (transfer rows from the batch)
                keys.append(f), lengths.append(ln), values.append(v)
        out.append(KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values),
                                                       lengths=torch.cat(lengths)).to(device))
    return out


def _build(a, kw: Dict, shadow: bool, lexico: Optional[str], device: torch.device = torch.device("cpu")):
    """lexico "transfer": on the tables with a shadow feature only (what trainer.transfer_wiring
    does: the transfer tables get lexico, the others keep the plain rule); "all": every table."""
    from trainer.config import EmbeddingConfig, EmbOptimConfig, TableConfig
    from trainer.sharding import shard_model

    lex = EmbOptimConfig(lr=0.01, lexico=True, **kw)
    per_table = {f"t{i}": TableConfig(optimizer=lex) for i in range(a.tables)
                 if lexico == "all" or (lexico == "transfer" and i < SHADOW_TABLES)}
    cfg = EmbeddingConfig(dim=a.dim, sharding_type=a.sharding, optimizer=EmbOptimConfig(lr=0.01, **kw),
                          tables=per_table)
    tables = _tables(a, shadow)
    return shard_model(_Wrap(tables), cfg, tables, dist.group.WORLD, device).dmp


def _step(dmp, kjt, lexico: bool) -> None:
    from trainer.optim.torchrec_adapter import set_main_loss

    d = dmp(kjt).to_dict()
    main = sum((v ** 2).sum() for k, v in d.items() if not k.endswith("__shadow")) / kjt.stride()
    tr = [(v ** 2).sum() for k, v in d.items() if k.endswith("__shadow")]
    if lexico:
        set_main_loss(dmp, main)
    (main + 0.1 * sum(tr) / kjt.stride() if tr else main).backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)   # the clock reads finished work, not queued work
    dist.barrier()


def _time(dmp, batches, a, lexico: bool, device: torch.device) -> Tuple[float, float]:
    """(wall ms/step, CPU ms/step of this process). On a shared CPU box the CPU time is not stretched
    by other jobs' time slices (it still sees their cache traffic), so it resolves a few percent where
    the wall clock cannot; on a GPU it is the host's launch cost only."""
    for s in range(a.warmup):
        _step(dmp, batches[s % len(batches)], lexico)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(a.steps):
        _step(dmp, batches[s % len(batches)], lexico)
    _sync(device)
    return (time.perf_counter() - t0) / a.steps * 1e3, (time.process_time() - c0) / a.steps * 1e3


def _state_bytes(kw: Dict, dim: int) -> int:
    from trainer.config import EmbOptimConfig
    from trainer.optim import fbgemm
    from trainer.optim.rules import STEP_RULES, rule_config_from

    cfg = EmbOptimConfig(**kw)
    return rule_config_from(cfg).state_bytes_per_row() if cfg.name in STEP_RULES else fbgemm.state_bytes_per_row(cfg, dim)


def _profile(models, data, a, steps: int) -> None:
    """Self CPU time per op and step: the transfer step without lexico (d = g + h) vs with it."""
    from torch.profiler import ProfilerActivity, profile

    names = ("cfsgd + transfer, d = g + h (ours)", "cfsgd + transfer + lexico (ours)")
    per = []
    for n in names:
        _, sh, lex = VARIANTS[n]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for s in range(steps):
                _step(models[n], data[sh][s % len(data[sh])], lex is not None)
        per.append({e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()})
    base, lex = per
    print(f"profile, self CPU ms/step over {steps} steps: without lexico {sum(v[0] for v in base.values()):.1f}, "
          f"with lexico {sum(v[0] for v in lex.values()):.1f}; the ops that differ most:")
    print("| op | d = g + h: ms/step (calls) | lexico: ms/step (calls) |")
    print("|---|---|---|")
    diff = sorted(set(base) | set(lex), key=lambda k: -abs(lex.get(k, (0, 0))[0] - base.get(k, (0, 0))[0]))
    for k in diff[:10]:
        b, x = base.get(k, (0.0, 0.0)), lex.get(k, (0.0, 0.0))
        print(f"| {k[:70]} | {b[0]:.2f} ({b[1]:g}) | {x[0]:.2f} ({x[1]:g}) |")


def _lexico_lines(med: Dict[str, float], best: Dict[str, float], prefix: str) -> None:
    keys = ("cfsgd (ours)", "cfsgd + transfer, d = g + h (ours)", "cfsgd + transfer + lexico (ours)")
    for label, m in (("median", med), ("best round", best)):
        plain, tr, lex = (m[k] for k in keys)
        print(f"{prefix}{label}: lexico adds {100 * (lex / tr - 1):+.1f}% to the step with the same transfer features "
              f"({100 * (lex / plain - 1):+.1f}% vs plain cfsgd, which has no shadow lookups or transfer loss)")


def main(argv: List[str] | None = None) -> int:
    a = _args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from trainer.dist import init_distributed

    env = init_distributed(a.device)   # 1 rank by hand (free port), or a torchrun rank; NCCL on cuda
    device = env.device
    from trainer.logs import setup_logging

    setup_logging(env.rank)   # our quiet levels: known-benign library warnings hidden, one rank talking
    from trainer.optim import kernel

    if device.type == "cpu":
        kernel.load_extension()
    rank, world = dist.get_rank(), dist.get_world_size()
    keep = {"fbgemm exact_sgd", "cfsgd (ours)", "cfsgd + transfer, d = g + h (ours)", "cfsgd + transfer + lexico (ours)"}
    names = [n for n in VARIANTS if not a.only or n in keep or any(w in n for w in a.only.split(","))]
    models = {n: _build(a, *VARIANTS[n], device) for n in names}
    data = {sh: _batches(a, rank, sh, device) for sh in (False, True)}
    res: Dict[str, List[float]] = {n: [] for n in models}
    cpu: Dict[str, List[float]] = {n: [] for n in models}
    for _ in range(a.rounds):  # interleaved rounds expose machine noise
        for n, dmp in models.items():
            _, sh, lex = VARIANTS[n]
            wall, proc = _time(dmp, data[sh], a, lexico=lex is not None, device=device)
            res[n].append(wall)
            cpu[n].append(proc)
    if rank == 0:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"world={world} device={where} sharding={a.sharding} tables={a.tables}x{a.rows}x{a.dim} "
              f"batch/rank={a.batch} ids/rank/step~{data[False][0].values().numel()} "
              f"our backward={kernel.backend(device)}")
        med = {n: statistics.median(v) for n, v in res.items()}
        best = {n: min(v) for n, v in res.items()}
        print("| optimizer | ms/step median of rounds | best round | vs fbgemm exact_sgd (median / best) | rounds | state bytes/row |")
        print("|---|---|---|---|---|---|")
        for n, v in res.items():
            print(f"| {n} | {med[n]:.1f} | {best[n]:.1f} | {med[n] / med['fbgemm exact_sgd']:.2f}x / "
                  f"{best[n] / best['fbgemm exact_sgd']:.2f}x | {', '.join(f'{x:.1f}' for x in v)} | "
                  f"{_state_bytes(VARIANTS[n][0], a.dim)} |")
        _lexico_lines(med, best, "")
        cmed = {n: statistics.median(v) for n, v in cpu.items()}
        cbest = {n: min(v) for n, v in cpu.items()}
        print(f"CPU time of rank 0's process per step ({'host side only' if device.type == 'cuda' else 'all its threads'}):")
        print("| optimizer | CPU ms/step median (min-max) | vs fbgemm exact_sgd (median / best) | rounds |")
        print("|---|---|---|---|")
        for n, v in cpu.items():
            print(f"| {n} | {cmed[n]:.1f} ({min(v):.1f}-{max(v):.1f}) | {cmed[n] / cmed['fbgemm exact_sgd']:.2f}x / "
                  f"{cbest[n] / cbest['fbgemm exact_sgd']:.2f}x | {', '.join(f'{x:.1f}' for x in v)} |")
        _lexico_lines(cmed, cbest, "CPU time, ")
    if a.profile and world == 1 and all(k in models for k in ("cfsgd + transfer, d = g + h (ours)",
                                                              "cfsgd + transfer + lexico (ours)")):
        _profile(models, data, a, a.profile)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
