"""`trainer.experiments.bench_kernel` in a tiny mode (real torchrun-less 1-rank gloo group, all variants):
the table has every variant, the ratios and the lexico line follow from the printed times, and
state bytes are the documented ones."""
from __future__ import annotations

import re
import subprocess

import pytest

from trainer import launch
from trainer.experiments.bench_kernel import VARIANTS
from trainer.launch import free_port

pytestmark = pytest.mark.slow
ROOT = launch.REPO


def _within_rounding(printed: float, num: float, den: float, scale: float = 1.0, shift: float = 0.0,
                     digits: float = 0.005) -> bool:
    """printed ~= scale * num / den + shift, where num and den were printed to 0.1 ms."""
    lo = scale * (num - 0.05) / (den + 0.05) + shift - digits
    hi = scale * (num + 0.05) / (den - 0.05) + shift + digits
    return lo <= printed <= hi


@pytest.mark.dist
def test_kernel_bench_tiny():
    cmd = launch.command(["--tables", "5", "--rows", "300", "--batch", "64", "--steps", "2", "--warmup", "1",
                          "--rounds", "2"], module="trainer.experiments.bench_kernel")
    out = subprocess.run(cmd, cwd=ROOT, env=launch.subprocess_env(threads=1), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in VARIANTS:
            rows[cells[0]] = cells
    assert set(rows) == set(VARIANTS), out.stdout
    med = {n: float(c[1]) for n, c in rows.items()}
    best = {n: float(c[2]) for n, c in rows.items()}
    for n, c in rows.items():
        rounds = [float(x) for x in c[4].split(",")]
        assert len(rounds) == 2 and min(rounds) == pytest.approx(best[n], abs=0.051)
        ratio_med, ratio_best = (float(x.strip().rstrip("x")) for x in c[3].split("/"))
        assert _within_rounding(ratio_med, med[n], med["fbgemm exact_sgd"]), c
        assert _within_rounding(ratio_best, best[n], best["fbgemm exact_sgd"]), c
    state = {n: int(c[5]) for n, c in rows.items()}
    assert state["cfsgd (ours)"] == 4 and state["fbgemm counter_sgd"] == 12 and state["fbgemm exact_sgd"] == 0
    m = re.search(r"^median: lexico adds ([+-][0-9.]+)% .* \(([+-][0-9.]+)% vs plain", out.stdout, re.M)
    assert m, out.stdout
    lex, tr, plain = (med[k] for k in ("cfsgd + transfer + lexico (ours)", "cfsgd + transfer, d = g + h (ours)",
                                       "cfsgd (ours)"))
    assert _within_rounding(float(m.group(1)), lex, tr, 100, -100, 0.05), (m.group(0), lex, tr)
    assert _within_rounding(float(m.group(2)), lex, plain, 100, -100, 0.05), (m.group(0), lex, plain)


def test_lexico_variant_switches_lexico_on_the_transfer_tables_only():
    """Mirrors trainer.transfer_wiring: tables with a shadow feature get lexico, the others not."""
    import torch.distributed as dist

    from trainer.experiments import bench_kernel as bench
    from trainer.optim.torchrec_adapter import tailrec_kernels_of

    # init_method, not MASTER_* in os.environ: later tests' subprocesses would inherit them
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        a = bench._args(["--tables", "6", "--rows", "100", "--batch", "8"])
        for lexico, want in (("transfer", {f"t{i}" for i in range(bench.SHADOW_TABLES)}),
                             ("all", {f"t{i}" for i in range(6)}), (None, set())):
            dmp = bench._build(a, dict(name="cfsgd"), True, lexico)
            got = {t.name for k in tailrec_kernels_of(dmp) if k.emb_module.cfg.lexico
                   for t in k.config.embedding_tables}
            assert got == want, lexico
    finally:
        dist.destroy_process_group()
