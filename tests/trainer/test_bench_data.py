"""``tailrec bench data`` end to end on a tiny input: every table is printed with numbers in it."""
from __future__ import annotations

import json
import re

import pytest

from trainer.experiments import bench_data

pytestmark = pytest.mark.slow


def test_bench_data_tiny(tmp_path, capsys):
    rc = bench_data.main(["--speed-rows", "4000", "--sizes", "3000", "--rounds", "1", "--batch-size", "256",
                          "--out", str(tmp_path), "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    for label in ("pyarrow.csv parse only, converter settings", "convert, hash mode", "convert, vocab mode",
                  "ParquetLoader, 2 ranks", "Criteo 1TB extrapolated", "| 3,000 |"):
        assert label in out, out
    data = json.loads((tmp_path / "b.json").read_text())
    speed = data["speed"]
    assert speed["hash:w1"]["rows"] == speed["parse:converter"]["rows"] == 4000
    assert all(v["rows_per_cpu_s"]["median"] > 0 for v in speed.values())
    assert speed["vocab:w2"]["speedup"]["n"] == 1 and data["memory"][0]["rss_mib"] > 50   # python + pyarrow
    ratio = re.search(r"convert, hash mode \| 1 \|[^|]*\|[^|]*\| ([0-9.]+)x", out)
    assert ratio and float(ratio.group(1)) > 0
