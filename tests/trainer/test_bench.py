"""``tailrec bench train`` in a tiny mode: real trainer processes, one table row per optimizer."""
from __future__ import annotations

import json
import re

import pytest

from trainer.experiments import bench_train as bench

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _rows(text: str) -> dict[str, list[str]]:
    """Main table rows by optimizer: cells of `| model | ranks | optimizer | ... |`."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[0] == "deepfm":
            out[cells[2]] = cells
    return out


def _num(cell: str) -> float:
    return float(cell.replace(",", "").split("/")[0])


def test_bench_train_tiny(tmp_path, capsys):
    rc = bench.main(["--rows", "5000", "--hash-size", "1000", "--eval-frac", "0.1", "--steps", "3", "--warmup", "1",
                     "--batch", "256", "--eval-batch", "1024", "--models", "deepfm", "--ranks", "1",
                     "--optimizers", "exact_sgd,cfsgd", "--work", str(tmp_path), "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = _rows(out)
    assert set(rows) == {"exact_sgd", "cfsgd"}, out
    for opt, cells in rows.items():
        assert cells[1] == "1"
        ms, ex_s, rss = _num(cells[3]), _num(cells[4]), _num(cells[5])
        assert ms > 0 and ex_s > 0 and rss > 100, cells          # a torch process is > 100 MiB
        assert ex_s == pytest.approx(256 / (ms / 1e3), rel=0.01)
    # optimizer state: exact_sgd none; cfsgd 4 B/row x 26 tables x 1001 rows, formula == checkpoint
    assert _num(rows["exact_sgd"][6]) == 0 and _num(rows["exact_sgd"][7]) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    cf = next(r for r in data["results"] if r["optimizer"] == "cfsgd")
    assert len(cf["checkpoint_state_bytes"]) == 26
    assert all(b >= 4 * 1001 for b in cf["checkpoint_state_bytes"].values())
    assert re.search(r"\| \*\*total\*\* \| 26,026 \| 0 \| 104,104", out), out   # per-table section


def test_bench_train_rejects_unknown_optimizer(capsys):
    assert bench.main(["--optimizers", "adam_typo"]) == 2


def test_bench_train_variant_mode_times_each_variant_against_the_control(tiny_ml, tmp_path, capsys):
    """Any config on any converted dataset, variants interleaved: what the transfer costs per step."""
    rc = bench.main(["--config", "configs/movielens_deepfm.yaml", "--data", str(tiny_ml), "--ranks", "1",
                     "--batch", "256", "--eval-batch", "1024", "--steps", "4", "--warmup", "1", "--rounds", "2",
                     "--variant", "cfsgd: --transfer.mode=baseline",
                     "--variant", "both: --transfer.mode=both --transfer.features=[movie_id]",
                     "--work", str(tmp_path), "--json", str(tmp_path / "v.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = {c[0]: c for c in ([x.strip() for x in line.strip().strip("|").split("|")] for line in out.splitlines())
            if len(c) == 8 and c[0] in ("cfsgd", "both")}
    assert set(rows) == {"cfsgd", "both"}, out
    assert rows["cfsgd"][4] == "+0.0%" and rows["cfsgd"][5] == "1.00, 1.00"
    data = json.loads((tmp_path / "v.json").read_text())["results"]
    both = next(r for r in data if r["optimizer"] == "both")
    ctrl = next(r for r in data if r["optimizer"] == "cfsgd")
    ratios = [b / c for b, c in zip(both["rounds_in_order"], ctrl["rounds_in_order"])]
    assert rows["both"][5] == ", ".join(f"{x:.2f}" for x in ratios)
    assert len(both["rounds_in_order"]) == 2 and both["steps"] == 4


def test_bench_train_variant_mode_needs_config_and_data(capsys):
    assert bench.main(["--variant", "a: --x.y=1"]) == 2
    assert "go together" in capsys.readouterr().err


def test_bench_train_runs_on_the_device_it_is_given(tmp_path):
    a = bench._args(["--device", "cuda", "--batch", "8"])
    cmd = bench.trainer_command("deepfm", 1, "cfsgd", tmp_path, tmp_path / "r", tmp_path / "o", a)
    assert "--train.device=cuda" in cmd and "--train.device=cpu" not in cmd
    assert "--train.device=cpu" in bench.trainer_command("deepfm", 1, "cfsgd", tmp_path, tmp_path / "r",
                                                          tmp_path / "o", bench._args([]))
