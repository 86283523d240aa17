"""``tailrec generate / convert / stats`` through data.cli.main (the data subcommands only)."""
from __future__ import annotations

import importlib.util

import pytest

from data.cli import main
from data.manifest import load_manifest
from data.writer import check_schema

needs_generate = pytest.mark.skipif(importlib.util.find_spec("data.generate") is None, reason="data.generate absent")
needs_stats = pytest.mark.skipif(importlib.util.find_spec("data.stats") is None, reason="data.stats absent")


@needs_generate
def test_generate_convert_movielens_with_stats(tmp_path, capsys):
    raw, ds = tmp_path / "raw", tmp_path / "ds"
    assert main(["generate", "--format", "movielens", "--out", str(raw), "--rows", "3000", "--seed", "1"]) == 0
    argv = ["convert", "movielens", "--src", str(raw), "--out", str(ds), "--no-progress", "--row-group-size", "512"]
    if importlib.util.find_spec("data.stats") is None:
        argv.append("--no-stats")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "positive" in out
    m = load_manifest(ds)
    check_schema(ds, m)
    assert m.row_group_size == 512 and m.source["kind"] == "movielens-1m"
    if "--no-stats" not in argv:
        assert m.stats, "compute_stats should record itself in the manifest"
        assert main(["stats", str(ds)]) == 0
        assert capsys.readouterr().out.strip()


@needs_generate
def test_generate_convert_criteo_hash_gz(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert main(["generate", "--format", "criteo", "--out", str(raw), "--rows", "500", "--gz"]) == 0
    assert (raw / "train.txt.gz").is_file()
    rc = main(["convert", "criteo", "--src", str(raw), "--out", str(tmp_path / "ds"), "--mode", "hash",
               "--hash-size", "1000", "--no-stats", "--no-progress"])
    assert rc == 0
    m = load_manifest(tmp_path / "ds")
    assert sum(s.rows for s in m.splits.values()) == 500
    assert m.source["options"]["mode"] == "hash" and m.feature("C1").num_embeddings == 1001


@needs_stats
def test_stats_on_missing_dataset_exit_2(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err      # the message names the dataset path


def test_convert_bad_options_exit_2(tmp_path, capsys):
    rc = main(["convert", "movielens", "--src", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "one --src directory" in capsys.readouterr().err
    rc = main(["convert", "criteo", "--src", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "file not found" in capsys.readouterr().err
