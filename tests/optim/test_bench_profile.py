"""`bench_kernel --profile`: where the lexico step's time goes, op by op, next to the same step
without lexico (tiny shapes, one real gloo rank)."""
import re
import subprocess

import pytest

from trainer import launch

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_profile_prints_both_steps_op_by_op():
    cmd = launch.command(["--tables", "5", "--rows", "300", "--batch", "64", "--steps", "2", "--warmup", "1",
                          "--rounds", "1", "--only", "none", "--profile", "2"], module="trainer.experiments.bench_kernel")
    out = subprocess.run(cmd, cwd=launch.REPO, env=launch.subprocess_env(threads=1), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"^profile, self CPU ms/step over 2 steps: without lexico ([0-9.]+), with lexico ([0-9.]+)",
                  out.stdout, re.M)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out.stdout
    rows = [ln for ln in out.stdout[m.end():].splitlines() if ln.startswith("| ") and not ln.startswith("| op")]
    assert len(rows) == 10, rows
    # the forward lookup is among the ops that differ (lexico runs its tables as a second kernel group)
    ops = {r.split("|")[1].strip(): r for r in rows}
    names = " ".join(ops)
    assert "fbgemm::dense_embedding_codegen_lookup_function" in names or "_LookupFunction" in names, rows
    # only the comparison rows ran (--only none keeps exact_sgd and the three lexico rows)
    table = [ln.split("|")[1].strip() for ln in out.stdout.splitlines() if ln.startswith("| ") and "x |" in ln]
    assert "fbgemm counter_sgd" not in table and "fbgemm exact_sgd" in table
