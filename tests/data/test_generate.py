"""data/generate.py: raw formats, code sets, long tail, label rates, planted structure, determinism."""
import gzip
import json
import re

import numpy as np

from data.generate import ML_GENRES, _hex_field, _int_field, _render, generate_criteo, generate_movielens

USER_RE = re.compile(r"^(\d+)::([MF])::(1|18|25|35|45|50|56)::(\d+)::(\d{5}(-\d{4})?)$")
MOVIE_RE = re.compile(r"^(\d+)::(.+) \((\d{4})\)::([^:]+)$")
RATING_RE = re.compile(r"^(\d+)::(\d+)::([1-5])::(\d{9,10})$")


def test_render_matches_python_formatting():
    v = np.array([0, 7, -3, 1234567, 45, -120])
    ok = np.array([True, True, True, True, False, True])
    h = np.array([0, 0xDEADBEEF, 15, 2**32 - 1, 1, 0x1A2B], np.uint64)
    got = _render([_int_field(v, 9, ok), _hex_field(h)], b"\t").decode().splitlines()
    want = [f"{x if k else ''}\t{y:08x}" for x, k, y in zip(v.tolist(), ok, h.tolist())]
    assert got == want


def test_movielens_format_and_code_sets(tmp_path):
    info = generate_movielens(tmp_path, rows=20_000, seed=1, users=300, movies=200)
    assert info["rows"] == 20_000 and info["rows_per_s"] > 0
    users = (tmp_path / "users.dat").read_bytes().decode("latin-1").split("\n")
    assert users[-1] == "" and len(users) == 301 and all(USER_RE.match(u) for u in users[:-1])
    assert all(0 <= int(USER_RE.match(u).group(4)) <= 20 for u in users[:-1])
    movies = (tmp_path / "movies.dat").read_text("latin-1").splitlines()
    assert len(movies) == 200
    for m in movies:
        g = MOVIE_RE.match(m)
        assert g and 1919 <= int(g.group(3)) <= 2000 and set(g.group(4).split("|")) <= set(ML_GENRES)
    lines = (tmp_path / "ratings.dat").read_text("latin-1").splitlines()
    assert len(lines) == 20_000 and all(RATING_RE.match(x) for x in lines[:2000])
    r = np.array([x.split("::") for x in lines], np.int64)
    assert r[:, 0].min() >= 1 and r[:, 0].max() <= 300 and r[:, 1].max() <= 200
    assert 956703932 <= r[:, 3].min() and r[:, 3].max() <= 1046454590
    assert b"\r" not in (tmp_path / "ratings.dat").read_bytes()


def test_movielens_long_tail_labels_and_plant(tmp_path):
    generate_movielens(tmp_path, rows=100_000, seed=0)
    r = np.fromstring((tmp_path / "ratings.dat").read_text().replace("::", " "), np.int64, sep=" ").reshape(-1, 4)
    kept = r[r[:, 2] != 3]
    assert 0.53 <= (kept[:, 2] > 3).mean() <= 0.62
    cnt = np.sort(np.bincount(r[:, 1], minlength=3701)[1:])[::-1]
    assert cnt[:740].sum() / cnt.sum() > 0.6 and np.median(cnt) < cnt.mean() / 2     # most ids are rare
    p = json.loads((tmp_path / "planted.json").read_text())
    assert p["seed"] == 0 and len(p["twins"]) > 100 and len(p["loners"]) > 50
    twins, parents = np.array(p["twins"]).T
    full = np.bincount(r[:, 1], minlength=3701)
    assert np.median(full[twins]) * 10 < np.median(full[parents])
    assert not set(twins) & set(p["loners"])
    movies = {int(m.split("::")[0]): m.split("::", 1)[1] for m in (tmp_path / "movies.dat").read_text("latin-1").splitlines()}
    for t, par in p["twins"][:20]:     # twins copy the parent's year and genres
        assert movies[t].split("(")[-1] == movies[par].split("(")[-1]


def test_movielens_deterministic(tmp_path):
    for d in ("a", "b"):
        generate_movielens(tmp_path / d, rows=5000, seed=7, users=200, movies=100)
    for name in ("users.dat", "movies.dat", "ratings.dat", "planted.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    generate_movielens(tmp_path / "c", rows=5000, seed=8, users=200, movies=100)
    assert (tmp_path / "c" / "ratings.dat").read_bytes() != (tmp_path / "a" / "ratings.dat").read_bytes()


def test_criteo_layout_and_rates(tmp_path):
    info = generate_criteo(tmp_path / "train.txt", rows=40_000, seed=0)
    assert info["rows_per_s"] > 0
    rows = [x.split("\t") for x in (tmp_path / "train.txt").read_text().splitlines()]
    assert len(rows) == 40_000 and {len(x) for x in rows} == {40}
    label = np.array([int(x[0]) for x in rows])
    assert set(label) <= {0, 1} and 0.21 <= label.mean() <= 0.30
    ints = [[v for v in col if v] for col in zip(*[x[1:14] for x in rows])]
    assert all(re.fullmatch(r"-?\d+", v) for col in ints for v in col[:500])
    assert min(map(int, ints[1])) < 0 and len(ints[0]) < 0.7 * len(rows)     # I2 negatives, I1 often empty
    cats = list(zip(*[x[14:] for x in rows]))
    assert all(re.fullmatch(r"[0-9a-f]{8}", v) for col in cats for v in col[:500] if v)
    distinct = [len(set(c)) for c in cats]
    assert min(distinct) <= 5 and max(distinct) > 10_000                     # tiny and huge vocabularies


def test_criteo_deterministic_and_gz(tmp_path):
    generate_criteo(tmp_path / "a.txt", rows=3000, seed=5)
    generate_criteo(tmp_path / "b.txt", rows=3000, seed=5)
    generate_criteo(tmp_path / "a.txt.gz", rows=3000, seed=5, gz=True)
    generate_criteo(tmp_path / "b.txt.gz", rows=3000, seed=5, gz=True)
    a = (tmp_path / "a.txt").read_bytes()
    assert a == (tmp_path / "b.txt").read_bytes()
    assert (tmp_path / "a.txt.gz").read_bytes() == (tmp_path / "b.txt.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.txt.gz").read_bytes()) == a
    generate_criteo(tmp_path / "c.txt", rows=3000, seed=6)
    assert (tmp_path / "c.txt").read_bytes() != a


def test_cli_param_sets_a_world_parameter_and_refuses_unknown_ones(tmp_path):
    import subprocess

    from trainer import launch

    def gen(*extra):
        cmd = launch.command(["generate", "--format", "movielens", "--out", str(tmp_path / "w"), "--rows", "2000",
                              *extra], module="trainer")
        return subprocess.run(cmd, cwd=launch.REPO, env=launch.subprocess_env(), capture_output=True, text=True)

    ok = gen("--param", "logit_scale=0.35", "--param", "clusters=4")
    assert ok.returncode == 0, ok.stderr
    planted = __import__("json").loads((tmp_path / "w" / "planted.json").read_text())
    assert planted["params"]["logit_scale"] == 0.35 and planted["params"]["clusters"] == 4
    bad = gen("--param", "nope=1")
    assert bad.returncode == 2 and "unknown generator parameters ['nope']" in bad.stderr
    assert gen("--param", "logit_scale=x").returncode == 2
