"""``tailrec demo``: stock TorchRec and our method on the same generated data, one comparison table."""
from __future__ import annotations

import math
import subprocess

import pytest

from trainer import launch
from trainer.experiments.demo import COLUMNS, comparison_table


def test_comparison_table_gives_each_bucket_and_our_gain_in_points():
    stock = {c: 0.80 for c in COLUMNS} | {"ms_per_step": 10.0, "epoch": 2}
    ours = {c: 0.80 + 0.001 * i for i, c in enumerate(COLUMNS)} | {"ms_per_step": 11.0, "epoch": 3}
    ours["loner"] = math.nan
    lines = comparison_table({"stock": stock, "tailrec": ours}).splitlines()
    assert lines[0].startswith("| run | all AUC | head AUC | torso AUC | tail AUC | twin AUC | loner AUC | ms/step")
    assert lines[2].startswith("| stock | 0.8000 |") and lines[3].startswith("| tailrec | 0.8000 | 0.8010 |")
    gain = lines[4].split("|")[2:-1]
    assert [g.strip() for g in gain[:5]] == ["+0.00", "+0.10", "+0.20", "+0.30", "+0.40"]
    assert gain[5].strip() == "+nan" and gain[6].strip() == "1.10x"


@pytest.mark.dist
def test_demo_trains_stock_and_ours_and_prints_the_comparison(tmp_path):
    out = tmp_path / "demo"
    cmd = launch.trainer_command("demo", None, ["--out", str(out), "--rows", "16000", "--nproc", "1",
                                                "--train.epochs=1", "--train.max_steps=6", "--data.batch_size=256"])
    proc = subprocess.run(cmd, cwd=launch.REPO, env=launch.subprocess_env(threads=1), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "comparison.md").read_text()
    assert "| stock |" in table and "| tailrec |" in table and "| tailrec - stock (pt) |" in table
    assert table.strip() in proc.stdout and (out / "comparison.png").stat().st_size > 1000
    stock_cfg = (out / "stock" / "config.yaml").read_text()
    ours_cfg = (out / "tailrec" / "config.yaml").read_text()
    assert "exact_rowwise_adagrad" in stock_cfg and "mode: baseline" in stock_cfg
    assert "name: cfsgd" in ours_cfg
