"""tailrec compare: variant parsing, the report's numbers (paired by seed, abundance of the sets), and a
tiny real comparison that resumes."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from trainer import launch
from trainer.experiments.compare import collect, expand, markdown, parse_variant, write_report

REPO = launch.REPO


def test_parse_and_expand():
    assert parse_variant("me4: --model.num_embeddings=4  --embedding.dim=32") == (
        "me4", ("--model.num_embeddings=4", "--embedding.dim=32"))
    assert parse_variant("plain:") == ("plain", ())
    for bad in ("no colon", ": --a=1", "x y: --a=1", "x: model.name=din", "x: --flag"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    v = expand([("a", ("--x.y=1",)), ("b", ())], [0, 2])
    assert [x.name for x in v] == ["a-s0", "a-s2", "b-s0", "b-s2"]
    assert v[1].overrides() == ["--x.y=1", "--train.seed=2"]
    with pytest.raises(ValueError, match="unique"):
        expand([("a", ()), ("a", ())], [0])


def test_a_variants_overrides_win_over_the_commands():
    """'Variants (overrides on top of the command's)': the trainer's parser keeps the last value."""
    from trainer.config import load_config
    from trainer.experiments.ablate import run_cmd
    (v,) = expand([("ctrl", ("--transfer.lexico_weight=0",))], [1])
    cmd = run_cmd(v, "configs/movielens_deepfm.yaml", "DATA", Path("RUN"), 1,
                  ["--transfer.lexico_weight=1", "--data.path=ELSEWHERE"])
    overrides = [a for a in cmd if a.startswith("--") and "=" in a and not a.startswith("--config")]
    cfg = load_config(str(REPO / "configs/movielens_deepfm.yaml"), overrides)
    assert cfg.transfer.lexico_weight == 0 and cfg.data.path == "DATA" and cfg.train.seed == 1


def _result(auc, tail, ia, sets=False):
    col = {("movie_id__sets" if sets else "movie_id"): {"method": "exact", "groups": {
        "all": {"rows": 10, "abundance": ia, "singular_values": []},
        "tail": {"rows": 4, "abundance": ia - 1, "singular_values": []}}}}
    test = {b: {"auc": auc + (tail if b == "tail" else 0.0), "logloss": 0.5} for b in ("all", "head", "torso", "tail")}
    entry = {"epoch": 1, "step": 5, "valid": {"all": {"auc": auc}}, "test": test, "collapse": col}
    return {"best": entry, "history": [entry], "ms_per_step": 3.0}


def test_report_pairs_by_seed_and_reads_the_sets(tmp_path):
    variants = expand([("ctrl", ()), ("me", ("--model.num_embeddings=2",))], [0, 1, 2])
    runs = {"ctrl-s0": _result(0.80, 0.0, 5.0), "ctrl-s1": _result(0.70, 0.0, 6.0), "ctrl-s2": _result(0.75, 0, 7.0),
            "me-s0": _result(0.81, 0.0, 8.0, sets=True), "me-s1": _result(0.72, 0.0, 9.0, sets=True)}   # s2 missing
    rows = collect(variants, runs, ["movie_id"])
    text = markdown(rows, ["movie_id"])
    # paired differences over the 2 common seeds: +1 and +2 points -> mean 1.50, sample std 0.71
    assert "| me | +1.50 ± 0.71 |" in text
    assert "| me | 2 |" in text and "| ctrl | 3 |" in text
    assert f"| ctrl | {np.mean([5, 6, 7]):.2f} ± 1.00 | {np.mean([4, 5, 6]):.2f} ± 1.00 |" in text
    assert "| me | 8.50 ± 0.71 | 7.50 ± 0.71 |" in text   # the sets' abundance stands for the feature
    for name, r in runs.items():
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(r))
    readme = write_report(tmp_path, variants, ["movie_id"], "T", "tailrec compare ...")
    body = readme.read_text()
    assert "5 of 6 runs finished; missing: me-s2" in body and (tmp_path / "compare.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())[1]["label"] == "me"


@pytest.mark.dist
def test_tiny_comparison_runs_and_resumes(tiny_ml, tmp_path):
    out = tmp_path / "cmp"

    def run():
        cmd = launch.trainer_command("compare", REPO / "configs/movielens_deepfm.yaml", [
            "--data", str(tiny_ml), "--out", str(out), "--seeds", "0", "--tables", "movie_id",
            "--variant", "bce: --loss.ranking=none", "--variant", "rank: --loss.ranking=listwise --loss.weight=0.5",
            "--jobs", "2", "--train.epochs=1", "--train.max_steps=4", "--data.batch_size=256",
            "--data.eval_batch_size=2048", "--train.log_every=1000"])
        proc = subprocess.run(cmd, cwd=REPO, env=launch.subprocess_env(threads=1), capture_output=True, text=True,
                              timeout=200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    assert "2 to run" in run().stdout
    res = json.loads((out / "runs" / "rank-s0" / "results.json").read_text())
    cfg = (out / "runs" / "rank-s0" / "config.yaml").read_text()
    assert "ranking: listwise" in cfg and "weight: 0.5" in cfg
    assert "2 already done, 0 to run" in run().stdout
    readme = (out / "README.md").read_text()
    assert f"{res['best']['test']['all']['auc']:.4f}" in readme
    ia = res["best"]["collapse"]["movie_id"]["groups"]["all"]["abundance"]
    assert f"{ia:.2f}" in readme


def test_slim_keeps_abundance_and_the_listed_spectra(tmp_path):
    from trainer.experiments.compare import slim_results

    r = _result(0.8, 0.0, 5.0)
    r["best"]["collapse"]["movie_id"]["groups"]["all"]["singular_values"] = [2.0, 1.0]
    r["history"] = [json.loads(json.dumps(r["best"]))]
    r["best"]["collapse"]["user_id"] = {"method": "exact", "groups": {"all": {"rows": 3, "abundance": 1.5,
                                                                               "singular_values": [2.0, 1.0]}}}
    d = tmp_path / "runs" / "a-s0"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(r))
    assert slim_results(tmp_path, ["movie_id"]) == 1
    got = json.loads((d / "results.json").read_text())["best"]["collapse"]
    assert got["movie_id"]["groups"]["all"]["singular_values"] == [2.0, 1.0]
    assert got["user_id"]["groups"]["all"] == {"rows": 3, "abundance": 1.5}
    hist = json.loads((d / "results.json").read_text())["history"][0]["collapse"]
    assert hist["movie_id"]["groups"]["all"] == {"rows": 10, "abundance": 5.0}
    assert slim_results(tmp_path, ["movie_id"]) == 0


def test_planted_groups_get_columns_when_the_runs_report_them():
    def run(twin):
        test = {b: {"auc": 0.8, "logloss": 0.4} for b in ("all", "head", "torso", "tail")}
        if twin is not None:
            test |= {"twin": {"auc": twin, "logloss": 0.5}, "loner": {"auc": 0.6, "logloss": 0.6}}
        return {"best": {"test": test}, "ms_per_step": 1.0, "history": []}

    variants = expand([("base", ()), ("both", ("--transfer.mode=both",))], [0, 1])
    runs = {"base-s0": run(0.80), "base-s1": run(0.82), "both-s0": run(0.83), "both-s1": run(0.86)}
    text = markdown(collect(variants, runs, []), [])
    assert "| AUC twin | AUC loner |" in text and "| Δ twin | Δ loner |" in text
    assert "| both | +0.00 ± 0.00 | +0.00 ± 0.00 | +0.00 ± 0.00 | +0.00 ± 0.00 | +3.50 ± 0.71 | +0.00 ± 0.00 |" in text
    plain = markdown(collect(variants, {k: run(None) for k in runs}, []), [])
    assert "twin" not in plain
