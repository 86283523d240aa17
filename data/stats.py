"""Long-tail statistics of a converted dataset's **train** split, written to ``DIR/stats/``.

Two streaming passes over the train Parquet files (memory: O(num_embeddings + nnz(cooc)), never rows):
pass 1 counts ids, pass 2 accumulates the co-occurrence with the global top-k ids (which needs pass 1).

Files (all loadable without pickle)::

    counts.npz          {feature: int64[num_embeddings]}  #train records containing the id
                        (a multi-hot bag counts an id once per record)
    cooc_<feature>.npz  scipy.sparse CSR int64 [num_embeddings, top_k] (scipy.sparse.load_npz):
                        s_i[f] = #train records containing both id i and top id f, f != i
    top_ids.json        [[feature, id, count], ...]: F, the top_k (feature, id) pairs ranked
                        globally by count (ties: feature order, then id); column j of cooc is F[j]
    buckets.json        {feature: {"head_min_count", "tail_max_count", ...}}
    summary.json        the long-tail profile per feature (what ``format_stats`` prints)

Buckets (per feature): sort the seen ids (count > 0) by count desc (ties by id). The head is the first
ceil(head_frac * seen) ids (the 80/20 "source" domain), the tail the last floor(tail_frac * seen).
They are stored as count thresholds so that any id can be classified: head = count >= head_min_count,
tail = count <= tail_max_count (unseen ids are tail), torso = in between. Ties at a threshold fall on the
threshold's side, so bucket sizes are approximate; tail_max_count < head_min_count always.
Files are byte-reproducible: the .npz zips carry a fixed timestamp.
"""
from __future__ import annotations

import json
import math
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from data.errors import DataError
from data.manifest import Manifest, SparseFeature, load_manifest

STATS_DIR = "stats"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
BUCKETS = ("head", "torso", "tail")


# ---------------------------------------------------------------- reproducible, pickle-free npz

def write_npz(path: str | Path, arrays: dict, compress: bool = True) -> None:
    """np.savez-compatible, but byte-reproducible (fixed zip timestamps) and refusing object arrays."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(tmp, "w", compression=mode) as z:
        for name, val in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            info.compress_type = mode
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(val), allow_pickle=False)
    tmp.replace(path)


def save_csr(path: str | Path, m: sp.csr_matrix) -> None:
    """Same keys as scipy.sparse.save_npz, so scipy.sparse.load_npz (allow_pickle=False) reads it."""
    write_npz(path, dict(indices=m.indices, indptr=m.indptr, format=b"csr",
                         shape=np.array(m.shape, np.int64), data=m.data))


def _stats_dir(dataset_dir) -> Path:
    d = Path(dataset_dir) / STATS_DIR
    if not (d / "summary.json").is_file():
        raise DataError(d, "no statistics here: run `tailrec convert` (or data.stats.compute_stats)")
    return d


# ---------------------------------------------------------------- reading (record, id) pairs

def _iter_batches(dataset_dir: Path, m: Manifest, columns: list[str]):
    for rel in m.splits["train"].files:
        path = dataset_dir / rel
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=max(m.row_group_size, 1024), columns=columns):
            yield path, batch


def _pairs(batch: pa.RecordBatch, feat: SparseFeature, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(record index, id) of one feature in one batch, one pair per distinct id per record."""
    arr = batch.column(feat.name)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        rec = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False).astype(np.int64)
        vals = pc.list_flatten(arr)
    else:
        rec, vals = np.arange(len(arr), dtype=np.int64), arr
    ok = vals.is_valid().to_numpy(zero_copy_only=False) if vals.null_count else None
    ids = vals.to_numpy(zero_copy_only=False)
    if ok is not None:
        rec, ids = rec[ok], ids[ok].astype(np.int64)
    ids = ids.astype(np.int64, copy=False)
    if len(ids) and (ids.min() < 0 or ids.max() >= feat.num_embeddings):
        bad = int(ids[(ids < 0) | (ids >= feat.num_embeddings)][0])
        raise DataError(path, f"id {bad} outside [0, {feat.num_embeddings})", field=feat.name)
    if feat.multi_hot and len(ids):
        key = np.unique(rec * feat.num_embeddings + ids)
        rec, ids = key // feat.num_embeddings, key % feat.num_embeddings
    return rec, ids


def _add_counts(counts: np.ndarray, ids: np.ndarray) -> None:
    if len(counts) <= 4 * len(ids):
        counts += np.bincount(ids, minlength=len(counts))
    else:                                   # avoid an O(num_embeddings) pass per chunk on huge tables
        u, c = np.unique(ids, return_counts=True)
        counts[u] += c


def _count_pass(dataset_dir: Path, m: Manifest) -> tuple[dict, int]:
    counts = {f.name: np.zeros(f.num_embeddings, np.int64) for f in m.sparse_features}
    rows = 0
    for path, batch in _iter_batches(dataset_dir, m, list(counts)):
        rows += batch.num_rows
        for f in m.sparse_features:
            _add_counts(counts[f.name], _pairs(batch, f, path)[1])
    return counts, rows


# ---------------------------------------------------------------- ranking and buckets

def _ranked_seen(counts: np.ndarray) -> np.ndarray:
    """Seen ids ordered by count desc, ties by id asc (stable sort of ascending ids)."""
    seen = np.flatnonzero(counts)
    return seen[np.argsort(-counts[seen], kind="stable")]


def _top_ids(counts: dict, names: list[str], top_k: int) -> list[tuple[str, int, int]]:
    """F: the top_k (feature, id) pairs by count over all fields (ties: feature order, then id)."""
    fi, ids, cs = [], [], []
    for k, name in enumerate(names):
        best = _ranked_seen(counts[name])[:top_k]
        fi.append(np.full(len(best), k)), ids.append(best), cs.append(counts[name][best])
    fi, ids, cs = np.concatenate(fi), np.concatenate(ids), np.concatenate(cs)
    order = np.lexsort((ids, fi, -cs))[:top_k]
    return [(names[fi[j]], int(ids[j]), int(cs[j])) for j in order]


def _buckets(counts: np.ndarray, head_frac: float, tail_frac: float) -> dict:
    ranked = _ranked_seen(counts)
    n = len(ranked)
    if n == 0:
        return {"head_min_count": 1, "tail_max_count": 0}
    head_min = int(counts[ranked[max(1, math.ceil(head_frac * n)) - 1]])
    n_tail = math.floor(tail_frac * n)
    tail_max = int(counts[ranked[n - n_tail]]) if n_tail else 0
    return {"head_min_count": head_min, "tail_max_count": min(tail_max, head_min - 1)}


def _classify(counts: np.ndarray, b: dict) -> np.ndarray:
    return np.where(counts >= b["head_min_count"], 0,
                    np.where(counts <= b["tail_max_count"], 2, 1)).astype(np.int8)


# ---------------------------------------------------------------- co-occurrence (pass 2)

class _Accumulator:
    """Sparse int64 sums keyed by row * width + col; pending pieces merged when they outgrow the sum."""

    def __init__(self, rows: int, width: int):
        self.rows, self.width = rows, width
        self.keys, self.vals = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_n = 0

    def add(self, keys: np.ndarray, vals: np.ndarray) -> None:
        self.pending.append((keys, vals))
        self.pending_n += len(keys)
        if self.pending_n > max(1 << 22, len(self.keys)):
            self._merge()

    def _merge(self) -> None:
        k = np.concatenate([self.keys] + [p[0] for p in self.pending])
        v = np.concatenate([self.vals] + [p[1] for p in self.pending])
        self.keys, inv = np.unique(k, return_inverse=True)
        self.vals = np.bincount(inv, weights=v, minlength=len(self.keys)).astype(np.int64)
        self.pending, self.pending_n = [], 0

    def csr(self) -> sp.csr_matrix:
        self._merge()
        rows = self.keys // self.width
        indptr = np.zeros(self.rows + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=self.rows), out=indptr[1:])
        cols = (self.keys % self.width).astype(np.int32)
        return sp.csr_matrix((self.vals, cols, indptr), shape=(self.rows, self.width))


def _f_lookup(top: list, names: list[str]) -> dict:
    """Per feature: (sorted ids of F in that feature, their F columns)."""
    out = {}
    for name in names:
        pairs = sorted((i, j) for j, (f, i, _) in enumerate(top) if f == name)
        out[name] = (np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64))
    return out


def _f_col(ids: np.ndarray, look: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """F column of each id, -1 where the id is not in F."""
    fids, fcols = look
    if not len(fids):
        return np.full(len(ids), -1, np.int64)
    pos = np.minimum(np.searchsorted(fids, ids), len(fids) - 1)
    return np.where(fids[pos] == ids, fcols[pos], -1)


def _cooc_chunk(pairs: dict, n: int, look: dict, accs: dict, top_k: int) -> None:
    """accs[f] += X_f^T X_F for one chunk (X = the chunk's one-hot records), minus the diagonal."""
    r, c = [], []
    for name, (rec, ids) in pairs.items():
        col = _f_col(ids, look[name])
        r.append(rec[col >= 0]), c.append(col[col >= 0])
    r, c = np.concatenate(r), np.concatenate(c)
    xf = sp.csr_matrix((np.ones(len(r), np.int64), (r, c)), shape=(n, top_k))
    for name, (rec, ids) in pairs.items():
        uniq, inv = np.unique(ids, return_inverse=True)
        xt = sp.csr_matrix((np.ones(len(ids), np.int64), (inv, rec)), shape=(len(uniq), n))
        prod = xt @ xf
        row = np.repeat(np.arange(len(uniq)), np.diff(prod.indptr))
        keep = prod.indices != _f_col(uniq, look[name])[row]       # s_i[f] excludes f == i
        accs[name].add(uniq[row[keep]] * top_k + prod.indices[keep], prod.data[keep])


def _cooc_pass(dataset_dir: Path, m: Manifest, top: list, top_k: int) -> dict:
    names = [f.name for f in m.sparse_features]
    look = _f_lookup(top, names)
    accs = {f.name: _Accumulator(f.num_embeddings, top_k) for f in m.sparse_features}
    for path, batch in _iter_batches(dataset_dir, m, names):
        pairs = {f.name: _pairs(batch, f, path) for f in m.sparse_features}
        _cooc_chunk(pairs, batch.num_rows, look, accs, top_k)
    return {name: acc.csr() for name, acc in accs.items()}


# ---------------------------------------------------------------- summary, entry point, loaders

def _gini(counts: np.ndarray) -> float:
    x = np.sort(counts[counts > 0]).astype(np.float64)
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    return float(2 * np.sum(np.arange(1, n + 1) * x) / (n * x.sum()) - (n + 1) / n)


def _feature_summary(counts: np.ndarray, b: dict, cooc_nnz: int) -> dict:
    total = int(counts.sum())
    ranked = _ranked_seen(counts)
    n_top = max(1, math.ceil(0.01 * len(ranked)))
    cls = _classify(counts, b)
    seen = counts > 0
    out = dict(num_embeddings=len(counts), seen_ids=int(seen.sum()), occurrences=total,
               top1pct_share=round(float(counts[ranked[:n_top]].sum()) / max(total, 1), 6),
               gini=round(_gini(counts), 6), cooc_nnz=int(cooc_nnz), **b)
    for k, name in enumerate(BUCKETS):
        sel = cls == k
        out[name] = dict(ids=int((sel & seen).sum()),
                         share=round(float(counts[sel].sum()) / max(total, 1), 6))
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def compute_stats(dataset_dir, top_k: int = 1000, head_frac: float = 0.2, tail_frac: float = 0.5) -> dict:
    """Write DIR/stats/ from the train split and record it in the manifest; returns the summary."""
    t0 = time.perf_counter()
    ds = Path(dataset_dir)
    m = load_manifest(ds)
    names = [f.name for f in m.sparse_features]
    counts, rows = _count_pass(ds, m)
    top = _top_ids(counts, names, top_k)
    cooc = _cooc_pass(ds, m, top, len(top))
    out = ds / STATS_DIR
    out.mkdir(exist_ok=True)
    write_npz(out / "counts.npz", counts)
    buckets = {n: _buckets(counts[n], head_frac, tail_frac) for n in names}
    for n in names:
        save_csr(out / f"cooc_{n}.npz", cooc[n])
    _write_json(out / "top_ids.json", [list(t) for t in top])
    _write_json(out / "buckets.json", buckets)
    summary = dict(train_rows=rows, top_k=len(top), head_frac=head_frac, tail_frac=tail_frac,
                   feature_order=names, features={n: _feature_summary(counts[n], buckets[n], cooc[n].nnz) for n in names})
    _write_json(out / "summary.json", summary)
    m.stats = {"dir": STATS_DIR, "top_k": len(top), "features": names,
               "head_frac": head_frac, "tail_frac": tail_frac}
    m.save(ds)
    dt = time.perf_counter() - t0
    return {**summary, "seconds": dt, "rows_per_s": rows / max(dt, 1e-9)}


def load_counts(dataset_dir) -> dict[str, np.ndarray]:
    with np.load(_stats_dir(dataset_dir) / "counts.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_buckets(dataset_dir) -> dict:
    return json.loads((_stats_dir(dataset_dir) / "buckets.json").read_text())


def load_summary(dataset_dir) -> dict:
    return json.loads((_stats_dir(dataset_dir) / "summary.json").read_text())


def load_top_ids(dataset_dir) -> list[tuple[str, int, int]]:
    return [tuple(t) for t in json.loads((_stats_dir(dataset_dir) / "top_ids.json").read_text())]


def bucket_of(dataset_dir, feature: str) -> np.ndarray:
    """int8 per id: 0 head, 1 torso, 2 tail (ids never seen in train are tail)."""
    b = load_buckets(dataset_dir)
    if feature not in b:
        raise KeyError(f"no statistics for feature {feature!r}; have {sorted(b)}")
    return _classify(load_counts(dataset_dir)[feature], b[feature])


def load_cooc(dataset_dir, feature: str) -> sp.csr_matrix:
    """[num_embeddings, top_k] co-occurrence counts with F (scipy's loader runs with allow_pickle=False)."""
    p = _stats_dir(dataset_dir) / f"cooc_{feature}.npz"
    if not p.is_file():
        raise KeyError(f"no co-occurrence file for feature {feature!r} ({p})")
    return sp.csr_matrix(sp.load_npz(p))


def format_stats(dataset_dir) -> str:
    """Readable long-tail profile per feature (`tailrec stats DIR`)."""
    s = load_summary(dataset_dir)
    lines = [f"{dataset_dir}: {s['train_rows']} train records, top_k={s['top_k']}, "
             f"head = top {s['head_frac']:.0%} of seen ids, tail = bottom {s['tail_frac']:.0%}",
             f"{'feature':<16}{'emb':>10}{'seen':>10}{'top1%':>7}{'gini':>6}  "
             f"{'head>=':>8}{'tail<=':>8}  {'records head/torso/tail':>24}"]
    for name in s["feature_order"]:
        f = s["features"][name]
        shares = "/".join(f"{f[b]['share']:.2f}" for b in BUCKETS)
        lines.append(f"{name:<16}{f['num_embeddings']:>10}{f['seen_ids']:>10}{f['top1pct_share']:>7.2f}"
                     f"{f['gini']:>6.2f}  {f['head_min_count']:>8}{f['tail_max_count']:>8}  {shares:>24}")
    return "\n".join(lines)
