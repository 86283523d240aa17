"""deploy/gpu_check.sh, the prepared GPU check, in its CPU mode (--cpu: same steps, tiny shapes,
Triton in its interpreter, 2 gloo ranks): the script runs end to end and prints what the GPU run
must report: the Triton-vs-float64 tests, then ours and FBGEMM's optimizers side by side at 1 and
2 ranks."""
import re
import subprocess
import sys

import pytest

from trainer import launch

pytestmark = [pytest.mark.dist, pytest.mark.slow]
NEEDED = ("cfsgd (ours)", "cfsgd + transfer + lexico (ours)", "fbgemm exact_sgd", "fbgemm exact_rowwise_adagrad",
          "fbgemm counter_sgd")


def test_gpu_check_script_runs_in_cpu_mode(tmp_path):
    env = {**launch.subprocess_env(threads=1), "OUT": str(tmp_path), "PY": sys.executable}
    r = subprocess.run(["bash", "deploy/gpu_check.sh", "--cpu"], cwd=launch.REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert re.search(r"^\.\.\s+\[100%\]", log, re.M), "the two interpreter tests ran and passed"
    for world in (1, 2):
        head = re.search(rf"^world={world} device=cpu .* our backward=(\w+)$", log, re.M)
        assert head, f"no {world}-rank bench table"
        block = log[head.end():].split("world=", 1)[0]
        rows = {ln.split("|")[1].strip() for ln in block.splitlines() if ln.startswith("| ")}
        assert set(NEEDED) <= rows, rows
    train = log[log.index("=== 4/4"):]      # the trainer end to end: the three variants side by side
    rows = {ln.split("|")[1].strip() for ln in train.splitlines() if ln.startswith("| ")}
    assert {"cfsgd", "both", "stock"} <= rows, train[-2000:]
    assert "=== done in" in log
