"""Embedding-collapse maths (pure; no process groups, no TorchRec): Gram matrices, singular-value
spectra and information abundance.

For an embedding matrix E (n rows, d columns) with singular values s_1 >= ... >= s_d >= 0::

    G  = E^T E                       (d x d, the Gram matrix; sums over rows, so shards add up)
    s  = sqrt(eig(G)), descending    (the singular values of E)
    IA = sum_k s_k / s_1             (information abundance: 1 = rank one, d = a flat spectrum)

Working from G instead of E lets the trainer add the Gram matrices of row shards (an all-reduce of
d x d numbers) instead of gathering rows (trainer/diagnostics.py). Everything is float64: the
eigenvalues of G are the *squares* of the singular values, so float32 would lose the small ones
(the tail of the spectrum is what collapse is about). Even in float64 a Gram matrix resolves singular
values only down to about sqrt(eps) = 1.5e-8 times the largest: below that (exactly rank-deficient
tables) they read as ~1e-8 instead of 0, which moves the abundance by less than 1e-7 per column.
"""
from __future__ import annotations

import math

import torch


def gram(rows: torch.Tensor) -> torch.Tensor:
    """E^T E in float64 for rows [n, d] (n may be 0)."""
    r = rows.detach().to(torch.float64)
    return r.T @ r


def grams_by_group(rows: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[num_groups, d, d]: the Gram matrix of the rows whose ``group`` is g, for each g. Rows with a
    group outside [0, num_groups) (e.g. -1) are left out."""
    d = rows.shape[1]
    out = torch.zeros(num_groups, d, d, dtype=torch.float64, device=rows.device)
    for g in range(num_groups):
        sel = rows[group == g]
        if sel.numel():
            out[g] = gram(sel)
    return out


def spectrum_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of any E with E^T E = ``g``. Eigenvalues that rounding
    pushed below zero are clamped to 0."""
    if g.shape[-1] != g.shape[-2]:
        raise ValueError(f"a Gram matrix is square, got {tuple(g.shape)}")
    g = g.to(torch.float64)
    ev = torch.linalg.eigvalsh(0.5 * (g + g.transpose(-1, -2)))   # symmetric by construction; enforce it
    return ev.clamp_min(0.0).sqrt().flip(-1)


def information_abundance(singular_values: torch.Tensor) -> float:
    """sum(s) / max(s); NaN for an all-zero (or empty) spectrum, where it is undefined."""
    s = singular_values.to(torch.float64)
    top = float(s.max()) if s.numel() else 0.0
    return float(s.sum()) / top if top > 0 else math.nan


def summarize(g: torch.Tensor, rows: int) -> dict:
    """What results.json records for one table (or bucket of rows): rows, abundance, the spectrum."""
    s = spectrum_from_gram(g.cpu())
    return {"rows": int(rows), "abundance": information_abundance(s) if rows else math.nan,
            # 7 significant digits: float32's precision, a third of the JSON
            "singular_values": [float(f"{x:.7g}") for x in s] if rows else []}
