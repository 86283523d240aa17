"""Synthetic long-tail raw data, reproducible from a seed (the product's embedded default dataset).

``generate_movielens`` writes the raw MovieLens-1M layout (``users.dat movies.dat ratings.dat``,
``::``-separated, latin-1) from a click model with planted structure, plus ``planted.json``:

* users belong to taste clusters (each with its own demographics) and have a latent vector near the
  cluster centre; a small *atypical* segment (old, retired/farmer, mostly female) forms its own cluster;
* a movie has a latent vector, a popularity (Zipf over a random id permutation, so most ids are rare)
  and an audience: a mixture over clusters from which its raters are drawn;
* **twins**: rare movies that copy a frequent parent's latent vector, bias, genres, year and audience,
  so their co-occurrence profile matches the parent's and transfer from the parent should help;
* **loners**: rare movies with a latent vector of their own, old odd-genre titles, rated only by the
  atypical segment, so their co-occurrence profile resembles no frequent movie.

Ratings come from p = sigmoid(u.v + b_u + b_m + b0): positive (4/5) with probability p, else 1/2/3;
b0 is calibrated so that ~57% of the ratings left after dropping the 3s are > 3.

``generate_criteo`` writes the Kaggle ``train.txt`` layout (label, I1..I13, C1..C26, tab-separated).
Both stream: rows are produced in vectorised chunks and rendered to bytes with numpy (a fixed-width
byte matrix with a padding sentinel that is dropped), never one Python string per field.
"""
from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np

# groups of the planted rare movies (planted.json); the trainer reports AUC per group
PLANTED_GROUPS = ("twin", "loner", "other")

CHUNK = 65536
_PAD = 0                                   # sentinel byte: padding removed before writing
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)

# Genuine ML-1M code sets (GroupLens README) and rough marginals of the real users.dat.
ML_AGES = np.array([1, 18, 25, 35, 45, 50, 56])
ML_AGE_P = np.array([222, 1103, 2096, 1193, 550, 496, 380], float)
ML_GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
             "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
             "Thriller", "War", "Western"]
_GENRE_P = np.array([503, 283, 105, 251, 1200, 211, 127, 1603, 68, 44, 343, 114, 106, 471, 276,
                     492, 143, 68], float)
_LONER_GENRES = [6, 9, 16, 17]             # Documentary, Film-Noir, War, Western: rare in the main mass
ML_T0, ML_T1 = 956703932, 1046454590        # ML-1M's first and last rating timestamps
_TITLE_WORDS = ["Night", "River", "Café", "Return", "Garden", "Señor", "Storm", "Letters", "Blue",
                "Journey", "Stranger", "Été", "Winter", "Promise", "Machine", "Island"]

# Criteo Kaggle: per-field vocabulary sizes (C1..C26) and missing rates, roughly as in train.txt.
CRITEO_VOCAB = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
                27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
_C_MISS = [0, 0, .03, .03, 0, .12, 0, 0, 0, 0, 0, .03, 0, 0, 0, .03, 0, 0, .44, .44, .03, .76, 0,
           .03, .44, .44]
_I_MISS = [.45, 0, .21, .22, .03, .22, .04, .0005, .04, .45, .04, .76, .22]
_I_MU = [0.5, 1.0, 1.8, 1.6, 7.5, 3.5, 1.3, 2.4, 3.5, 0.3, 0.8, 0.3, 1.6]   # log-scale of each I


# ---------------------------------------------------------------- byte rendering (shared)

def _int_field(v: np.ndarray, width: int, valid: np.ndarray | None = None) -> np.ndarray:
    """(n, width+1) bytes: optional '-', then decimal digits; leading zeros and invalid rows padded."""
    v = np.asarray(v, np.int64)
    a = np.minimum(np.abs(v), 10 ** width - 1)
    a = a.astype(np.int32) if width <= 9 else a      # int32 division is about twice as fast
    pw = 10 ** np.arange(width - 1, -1, -1, dtype=a.dtype)
    d = ((a[:, None] // pw) % 10).astype(np.uint8)
    lead = np.logical_and.accumulate(d == 0, axis=1)
    lead[:, -1] = False                    # zero itself still prints one digit
    out = np.empty((len(v), width + 1), np.uint8)
    out[:, 1:] = np.where(lead, _PAD, d + 48)
    out[:, 0] = np.where(v < 0, ord("-"), _PAD)
    if valid is not None:
        out[~valid] = _PAD
    return out


def _hex_field(v: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(n, 8) lowercase hex of uint32 values; invalid rows padded (an empty field)."""
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    out = _HEX[(v.astype(np.uint32)[:, None] >> shifts) & 15]
    if valid is not None:
        out[~valid] = _PAD
    return out


def _render(fields: list[np.ndarray], sep: bytes) -> bytes:
    """Join field byte matrices with `sep`, one line per row, dropping the padding sentinel."""
    n, k = fields[0].shape[0], len(sep)
    mat = np.empty((n, sum(f.shape[1] for f in fields) + k * (len(fields) - 1) + 1), np.uint8)
    col = 0
    for i, f in enumerate(fields):
        mat[:, col:col + f.shape[1]] = f
        col += f.shape[1]
        if i < len(fields) - 1:
            mat[:, col:col + k] = np.frombuffer(sep, np.uint8)
            col += k
    mat[:, col] = ord("\n")
    buf = mat.ravel()
    return buf[buf != _PAD].tobytes()


def _zipf_p(n: int, a: float, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """Zipf-Mandelbrot probabilities 1/(rank+shift)^a over n ids, in a random id order (ids are not ranks)."""
    p = 1.0 / (np.arange(1, n + 1) + shift) ** a
    return (p / p.sum())[rng.permutation(n)]


def _sample(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _calibrate(z: np.ndarray, target: float) -> float:
    """Intercept b with mean(sigmoid(z + b)) == target (bisection; deterministic)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(z + mid)))) < target else (lo, mid)
    return (lo + hi) / 2


# ---------------------------------------------------------------- MovieLens-1M world

ML_DEFAULTS = dict(dim=8, clusters=6, atypical_frac=0.03, movie_zipf=1.1, movie_shift=15.0, user_zipf=0.7,
                   twin_frac=0.06, loner_frac=0.04, parent_frac=0.05, tail_start=0.5,
                   noise=0.6, pos_rate=0.448, logit_scale=1.0)


def _ml_users(rng: np.random.Generator, n: int, p: dict) -> dict:
    """Cluster, demographics, latent vector, bias, activity and join time per user."""
    k = p["clusters"]
    n_atyp = max(1, round(p["atypical_frac"] * n))
    cl = rng.permutation(np.r_[np.full(n_atyp, k), rng.integers(0, k, n - n_atyp)])
    age_w = np.vstack([rng.dirichlet(ML_AGE_P / ML_AGE_P.sum() * 20) for _ in range(k)]
                      + [np.r_[np.zeros(5), 0.2, 0.8]])            # atypical: 50/56 years old
    occ_w = np.vstack([rng.dirichlet(np.full(21, 2.0)) for _ in range(k)]
                      + [np.bincount([13, 8, 9], [0.6, 0.3, 0.1], minlength=21)])
    p_male = np.r_[rng.uniform(0.55, 0.85, k), 0.2]
    u = rng.random((n, 3))
    age = ML_AGES[(u[:, :1] > np.cumsum(age_w, 1)[cl]).sum(1).clip(0, 6)]
    occ = (u[:, 1:2] > np.cumsum(occ_w, 1)[cl]).sum(1).clip(0, 20)
    zips = rng.integers(1000, 99999, n)
    plus4 = np.where(rng.random(n) < 0.01, rng.integers(1, 9999, n), -1)   # some "12345-6789"
    return dict(cluster=cl, gender=np.where(u[:, 2] < p_male[cl], "M", "F"), age=age, occ=occ,
                zip=zips, plus4=plus4, act=_zipf_p(n, p["user_zipf"], rng),
                join=np.where(rng.random(n) < 0.9, rng.uniform(ML_T0, 975e6, n),
                              rng.uniform(ML_T0, ML_T1 - 86400, n)).astype(np.int64))


def _ml_roles(rng: np.random.Generator, pop: np.ndarray, p: dict) -> tuple[dict, np.ndarray]:
    """Pick twins (rare, copying a frequent parent) and loners (rare, atypical) by popularity rank."""
    n = len(pop)
    rank = np.argsort(-pop, kind="stable")
    tail = rng.permutation(rank[int(p["tail_start"] * n):])
    n_tw, n_lo = round(p["twin_frac"] * n), round(p["loner_frac"] * n)
    parents = rng.choice(rank[:max(1, int(p["parent_frac"] * n))], n_tw)
    return dict(zip(tail[:n_tw].tolist(), parents.tolist())), np.sort(tail[n_tw:n_tw + n_lo])


def _ml_movies(rng: np.random.Generator, n: int, centres: np.ndarray, p: dict) -> dict:
    k, d = p["clusters"], p["dim"]
    pop = _zipf_p(n, p["movie_zipf"], rng, p["movie_shift"])
    twins, loners = _ml_roles(rng, pop, p)
    prim = rng.integers(0, k, n)
    aud = np.vstack([np.r_[0.3 * rng.dirichlet(np.ones(k)), 0.0] for _ in range(n)])
    aud[np.arange(n), prim] += 0.7
    vec = centres[prim] + p["noise"] * rng.normal(size=(n, d))
    bias = rng.normal(0, 0.3, n)
    gw = _GENRE_P.copy()
    gw[_LONER_GENRES] *= 0.3                     # keep the loners' genres rare in the main mass
    genres = [np.sort(rng.choice(18, rng.integers(1, 4), replace=False, p=gw / gw.sum()))
              for _ in range(n)]
    year = np.clip(2000 - rng.exponential(8, n).astype(int), 1919, 2000)
    for m in loners:
        aud[m] = np.r_[np.zeros(k), 1.0]
        vec[m] = centres[k] + p["noise"] * rng.normal(size=d)
        genres[m] = np.sort(rng.choice(_LONER_GENRES, rng.integers(1, 3), replace=False))
        year[m] = rng.integers(1925, 1956)
    for t, par in twins.items():
        aud[t], vec[t], bias[t], genres[t], year[t] = aud[par], vec[par], bias[par], genres[par], year[par]
    return dict(pop=pop, aud_cdf=np.cumsum(aud, 1), vec=vec, bias=bias, genres=genres, year=year,
                twins=twins, loners=loners)


def _ml_title(rng: np.random.Generator, i: int, year: int) -> str:
    w = rng.choice(_TITLE_WORDS, 2, replace=False)
    t = f"{w[0]} {w[1]} {i}"
    return (f"{t}, The" if rng.random() < 0.1 else t) + f" ({year})"


class _MLWorld:
    """Everything the click model needs; built once from the seed."""

    def __init__(self, rng: np.random.Generator, users: int, movies: int, p: dict):
        self.p = p
        self.centres = rng.normal(size=(p["clusters"] + 1, p["dim"]))
        self.u = _ml_users(rng, users, p)
        self.u_vec = self.centres[self.u["cluster"]] + p["noise"] * rng.normal(size=(users, p["dim"]))
        self.u_bias = rng.normal(0, 0.3, users)
        self.m = _ml_movies(rng, movies, self.centres, p)
        self.m_cdf = np.cumsum(self.m["pop"])
        self.by_cluster = [np.flatnonzero(self.u["cluster"] == c) for c in range(p["clusters"] + 1)]
        self.c_cdf = [np.cumsum(self.u["act"][ix]) / self.u["act"][ix].sum() for ix in self.by_cluster]
        self.b0 = 0.0
        self.b0 = _calibrate(self._logits(*self._pairs(np.random.default_rng(rng.integers(2**63)), 20000)),
                             p["pos_rate"])

    def _pairs(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(user index, movie index): movie by popularity, then a rater from the movie's audience."""
        m = _sample(self.m_cdf / self.m_cdf[-1], rng.random(n))
        c = (rng.random(n)[:, None] > self.m["aud_cdf"][m]).sum(1).clip(0, self.p["clusters"])
        u = np.empty(n, np.int64)
        for k, ix in enumerate(self.by_cluster):
            sel = np.flatnonzero(c == k)
            if len(sel):
                u[sel] = ix[_sample(self.c_cdf[k], rng.random(len(sel)))]
        return u, m

    def _logits(self, u: np.ndarray, m: np.ndarray) -> np.ndarray:
        # logit_scale < 1 weakens the signal (a harder world, closer to real MovieLens AUCs)
        return (self.p["logit_scale"] * (np.einsum("nd,nd->n", self.u_vec[u], self.m["vec"][m])
                                         + self.u_bias[u] + self.m["bias"][m]) + self.b0)

    def ratings(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
        u, m = self._pairs(rng, n)
        pos = rng.random(n) < 1 / (1 + np.exp(-self._logits(u, m)))
        neg = _sample(np.array([0.25, 0.6, 1.0]), rng.random(n)) + 1          # 1/2/3
        rating = np.where(pos, 4 + (rng.random(n) < 0.45), neg)
        late = rng.random(n) < 0.1
        ts = self.u["join"][u] + np.where(late, rng.uniform(0, 1, n) * (ML_T1 - self.u["join"][u]),
                                          rng.exponential(30 * 86400, n)).astype(np.int64)
        return u + 1, m + 1, rating, np.minimum(ts, ML_T1)


def _write_ml_side_files(out: Path, w: _MLWorld, rng: np.random.Generator) -> None:
    u = w.u
    with open(out / "users.dat", "w", encoding="latin-1", newline="\n") as f:
        for i in range(len(u["age"])):
            z = f"{u['zip'][i]:05d}" + (f"-{u['plus4'][i]:04d}" if u["plus4"][i] >= 0 else "")
            f.write(f"{i + 1}::{u['gender'][i]}::{u['age'][i]}::{u['occ'][i]}::{z}\n")
    with open(out / "movies.dat", "w", encoding="latin-1", newline="\n") as f:
        for i, (g, y) in enumerate(zip(w.m["genres"], w.m["year"])):
            genres = "|".join(ML_GENRES[j] for j in g)
            f.write(f"{i + 1}::{_ml_title(rng, i + 1, int(y))}::{genres}\n")


def generate_movielens(out_dir, rows: int = 200_000, seed: int = 0, users: int = 6040,
                       movies: int = 3700, **params) -> dict:
    """Write users.dat, movies.dat, ratings.dat (raw ML-1M layout) and planted.json into out_dir."""
    t0 = time.perf_counter()
    p = {**ML_DEFAULTS, **params}
    unknown = set(params) - set(ML_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown generator parameters {sorted(unknown)}; known: {sorted(ML_DEFAULTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world_rng, row_rng, side_rng = (np.random.default_rng([seed, s]) for s in range(3))
    w = _MLWorld(world_rng, users, movies, p)
    _write_ml_side_files(out, w, side_rng)
    with open(out / "ratings.dat", "wb") as f:
        for start in range(0, rows, CHUNK):
            cols = w.ratings(row_rng, min(CHUNK, rows - start))
            f.write(_render([_int_field(c, 10) for c in cols], b"::"))
    planted = dict(seed=seed, rows=rows, users=users, movies=movies, params=p,
                   twins=[[t + 1, par + 1] for t, par in sorted(w.m["twins"].items())],
                   loners=[int(m) + 1 for m in w.m["loners"]],
                   atypical_users=[int(i) + 1 for i in w.by_cluster[-1]])
    (out / "planted.json").write_text(json.dumps(planted, indent=1) + "\n")
    dt = time.perf_counter() - t0
    return dict(out_dir=str(out), rows=rows, users=users, movies=movies, twins=len(planted["twins"]),
                loners=len(planted["loners"]), seconds=dt, rows_per_s=rows / max(dt, 1e-9))


# ---------------------------------------------------------------- Criteo Kaggle layout

def _mix32(x: np.ndarray, salt: int) -> np.ndarray:
    """Bijective scramble of uint32 (odd multiply, xor-shift): distinct ranks -> distinct hex values."""
    x = (x.astype(np.uint64) * 0x9E3779B1 + salt) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    return x ^ (x >> 13)


def _power_rank(u: np.ndarray, vocab: int, a: float) -> np.ndarray:
    """Rank in [1, vocab] from a truncated power law p(r) ~ r^-a (inverse CDF, no vocab-sized table)."""
    e = 1.0 - a
    r = ((vocab + 1.0) ** e - 1.0) * u + 1.0
    return np.minimum(np.floor(r ** (1.0 / e)), vocab).astype(np.int64)


class _CriteoWorld:
    def __init__(self, rng: np.random.Generator):
        self.zipf = rng.uniform(1.05, 1.35, 26)
        self.salt = rng.integers(0, 2**32, 26)
        self.label_cats = [0, 1, 5, 13, 16]            # C1, C2, C6, C14, C17 drive the click model
        self.b0 = 0.0
        self.b0 = _calibrate(self.chunk(np.random.default_rng(rng.integers(2**63)), 20000)[3], 0.256)

    def chunk(self, rng: np.random.Generator, n: int) -> tuple:
        """(ints, int_valid, cats (rank), logits) for n rows."""
        ints = np.floor(np.exp(rng.normal(_I_MU, 1.3, (n, 13)))).astype(np.int64) - 1
        ints = np.maximum(ints, 0)
        ints[:, 1] = np.where(rng.random(n) < 0.1, -rng.integers(1, 4, n), ints[:, 1])  # I2 < 0 as in Criteo
        i_ok = rng.random((n, 13)) >= np.array(_I_MISS)
        cats = np.column_stack([_power_rank(rng.random(n), v, a) for v, a in zip(CRITEO_VOCAB, self.zipf)])
        z = np.full(n, self.b0)
        for j in self.label_cats:
            z += 1.5 * (_mix32(cats[:, j], 7 + j) / 2**32 - 0.5)      # a fixed random effect per value
        z += 0.3 * np.log1p(ints[:, 0]) * i_ok[:, 0] - 0.4 * ~i_ok[:, 0] - 0.1 * np.log1p(ints[:, 6])
        return ints, i_ok, cats, z

    def render(self, rng: np.random.Generator, n: int) -> bytes:
        ints, i_ok, cats, z = self.chunk(rng, n)
        label = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
        c_ok = rng.random((n, 26)) >= np.array(_C_MISS)
        fields = [_int_field(label, 1)]
        fields += [_int_field(ints[:, j], 9, i_ok[:, j]) for j in range(13)]
        fields += [_hex_field(_mix32(cats[:, j], int(self.salt[j])), c_ok[:, j]) for j in range(26)]
        return _render(fields, b"\t")


def generate_criteo(out_file, rows: int, seed: int = 0, gz: bool = False) -> dict:
    """Write `rows` lines of the Criteo Kaggle train.txt layout (gzip with mtime 0 when gz, so reproducible)."""
    t0 = time.perf_counter()
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    world = _CriteoWorld(np.random.default_rng([seed, 0]))
    rng = np.random.default_rng([seed, 1])
    with open(out, "wb") as raw:
        f = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) if gz else raw
        try:
            for start in range(0, rows, CHUNK):
                f.write(world.render(rng, min(CHUNK, rows - start)))
        finally:
            if gz:
                f.close()
    dt = time.perf_counter() - t0
    return dict(out_file=str(out), rows=rows, gz=gz, seconds=dt, rows_per_s=rows / max(dt, 1e-9))
