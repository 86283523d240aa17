"""Triton kernel of our fused backward + update (the CUDA path of kernel.TailrecTBE).

One pass per unique row, after segments.sort_lookups has sorted the step's lookups by row
(FBGEMM's GPU TBE backward design: sort the ids, then one program per row block). A program owns
ROWS_PER_PROG consecutive unique rows; for each it
  1. sums the row's main-loss gradient g and transfer gradient h from its lookups (tiles of
     BLOCK_L lookups x BLOCK_D columns gathered from the pooled gradient, times the lookup weight),
  2. forms the direction (g + h, or item-wise lexico: h + lambda g with the barrier phi),
  3. updates the counter / Adagrad state and the row (CF-SGD both forms, warm-up, rowwise Adagrad),
all in registers, reading every input once. ub_mode="table" (the step size needs the mean of
mean_d(d^2) over the table's updated rows first) takes two launches of the same kernel: the first
only writes each row's mean_d(d^2), `_table_ub` folds them into the per-table state with prefix sums
over the sorted rows, the second applies the steps. Nothing is read back on the host: the number
of unique rows, the global step and the main loss are device scalars the kernel loads itself, and
the grid covers the upper bound (one slot per lookup); programs past the unique rows return at once.

The maths is the float32 twin of rules.py (and of csrc/tailrec_update.cpp); tests/optim checks all
three against the float64 formulas of tests/optim/reference.py. Without a GPU the same kernel runs
in Triton's interpreter (TRITON_INTERPRET=1 set before Triton is first imported) on CPU tensors.

Hyper-parameters come from RuleConfig in one place, kernel_params.launch_params (shared with the C++
op): a new RuleConfig option is a new entry there plus its use in `_update_rows_kernel`.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from trainer.optim.kernel_params import launch_params
from trainer.optim.rules import RuleConfig
from trainer.optim.segments import FeatureMeta, Segments


@triton.jit
def _gather_row(key_ptr, gaddr_ptr, wt_ptr, sh_ptr, grad_ptr, s, e, cols, cmask,
                HAS_SHADOW: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum of weighted gradient slices of lookups s..e-1 (one row), split main / transfer."""
    g = tl.zeros([BLOCK_D], dtype=tl.float32)
    h = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_main = s * 0
    n_sh = s * 0
    for j0 in range(s, e, BLOCK_L):
        j = j0 + tl.arange(0, BLOCK_L)
        jm = j < e
        ga = tl.load(gaddr_ptr + j, mask=jm, other=0)
        w = tl.load(wt_ptr + j, mask=jm, other=0.0)
        tile = tl.load(grad_ptr + ga[:, None] + cols[None, :], mask=jm[:, None] & cmask[None, :], other=0.0)
        contrib = tile * w[:, None]
        if HAS_SHADOW:
            sh = tl.load(sh_ptr + j, mask=jm, other=0) != 0
            is_main = jm & (sh == 0)
            is_sh = jm & sh
            g += tl.sum(tl.where(is_main[:, None], contrib, 0.0), axis=0)
            h += tl.sum(tl.where(is_sh[:, None], contrib, 0.0), axis=0)
            n_main += tl.sum(is_main.to(tl.int64), axis=0)
            n_sh += tl.sum(is_sh.to(tl.int64), axis=0)
        else:
            g += tl.sum(contrib, axis=0)
            n_main += tl.sum(jm.to(tl.int64), axis=0)
    return g, h, n_main, n_sh


@triton.jit
def _counter_hash(row, step):
    """rules.counter_hash on int64 values: every product stays below 2^63, so the bits match."""
    x = ((row & 0xFFFFFFFF) * 0x27D4EB2D + (step & 0xFFFFFFFF)) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _lexico(g, h, has_h, loss, alpha, lam_max, h_clip,
            HAS_LAM_MAX: tl.constexpr, H_CLIP: tl.constexpr, APPLY_ALL: tl.constexpr):
    """Item-wise barrier (rules.lexico_direction): returns (direction, lambda)."""
    gg = tl.sum(g * g, axis=0)
    g_zero = gg == 0.0
    keep_h = has_h & (gg > 0.0)
    h = tl.where(keep_h, h, 0.0)
    if H_CLIP:
        hn = tl.sqrt_rn(tl.sum(h * h, axis=0))
        cap = h_clip * tl.sqrt_rn(gg)
        h = h * tl.where(hn > cap, cap / tl.maximum(hn, 1e-30), 1.0)
    phi = alpha * tl.minimum(gg, tl.maximum(loss, 0.0))
    lam = (phi - tl.sum(h * g, axis=0)) / tl.maximum(gg, 1e-30)
    lam = tl.maximum(lam, 0.0)
    if HAS_LAM_MAX:
        lam = tl.minimum(lam, lam_max)
    if not APPLY_ALL:
        lam = tl.where(has_h, lam, 1.0)
    lam = tl.where(g_zero, 0.0, lam)
    return h + lam * g, lam


@triton.jit
def _update_rows_kernel(
        key_ptr, gaddr_ptr, wt_ptr, sh_ptr, tab_ptr, seg_ptr, nseg_ptr, grad_ptr,
        row_off_ptr, w_off_ptr, dim_ptr, row_base_ptr, ctab_ptr, cthr_ptr,
        w_ptr, cnt_ptr, last_ptr, ada_ptr, ub_ptr, x_ptr, step_ptr, loss_ptr, loss_scale,
        out_key_ptr, out_lam_ptr, out_upd_ptr,
        lr, eps, halflife, ub, horizon, lr_max, alpha, lam_max, h_clip, adj_iter,
        ADAGRAD: tl.constexpr, HL_MODE: tl.constexpr, PAPER: tl.constexpr, HAS_LR_MAX: tl.constexpr,
        WARMUP: tl.constexpr, LEXICO: tl.constexpr, HAS_LAM_MAX: tl.constexpr, H_CLIP: tl.constexpr,
        APPLY_ALL: tl.constexpr, TABLE_UB: tl.constexpr, UB_ROW_FLOOR: tl.constexpr, STATS: tl.constexpr,
        HAS_SHADOW: tl.constexpr, COUNTER_BYTES: tl.constexpr,
        ROWS_PER_PROG: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    n_rows = tl.load(nseg_ptr)
    step = tl.load(step_ptr)
    stepf = step.to(tl.float32)
    loss = 0.0
    if LEXICO:
        loss = tl.load(loss_ptr) * loss_scale
    cols = tl.arange(0, BLOCK_D)
    for r in range(ROWS_PER_PROG):
        u = pid * ROWS_PER_PROG + r
        if u < n_rows:
            s = tl.load(seg_ptr + u)
            e = tl.load(seg_ptr + u + 1)
            key = tl.load(key_ptr + s).to(tl.int64)
            t = tl.load(tab_ptr + s)
            D = tl.load(dim_ptr + t)
            cmask = cols < D
            g, h, n_main, n_sh = _gather_row(key_ptr, gaddr_ptr, wt_ptr, sh_ptr, grad_ptr, s, e, cols, cmask,
                                             HAS_SHADOW, BLOCK_L, BLOCK_D)
            lam = 0.0
            if LEXICO:
                d, lam = _lexico(g, h, n_sh > 0, loss, alpha, lam_max, h_clip, HAS_LAM_MAX, H_CLIP, APPLY_ALL)
                do_update = n_main > 0   # transfer-only rows: nothing certified, not counted
            else:
                d = g + h
                do_update = n_main >= 0
            Df = D.to(tl.float32)
            tl.store(out_key_ptr + u, key)
            tl.store(out_upd_ptr + u, do_update.to(tl.int8))
            if STATS:
                # pass 1 of ub_mode="table": x = mean_d(d^2) of every row that will be updated
                tl.store(x_ptr + u, tl.where(do_update, tl.sum(d * d, axis=0) / Df, 0.0))
            else:
                tl.store(out_lam_ptr + u, lam)
            if not STATS:
                if do_update:
                    if ADAGRAD:
                        ssum = tl.load(ada_ptr + key) + tl.sum(d * d, axis=0) / Df
                        tl.store(ada_ptr + key, ssum)
                        eta = lr / (tl.sqrt_rn(ssum) + eps)
                    else:
                        if COUNTER_BYTES != 4:
                            # approximate counter: raise the level k with probability b^-k (rules.py)
                            lv = tl.load(cnt_ptr + key).to(tl.int32)
                            grow = key - tl.load(row_off_ptr + t) + tl.load(row_base_ptr + t)
                            coin = (_counter_hash(grow, step) >> 8) < tl.load(cthr_ptr + lv).to(tl.int64)
                            lv = lv + coin.to(tl.int32)
                            tl.store(cnt_ptr + key, lv.to(cnt_ptr.dtype.element_ty))
                            c = tl.load(ctab_ptr + lv)
                        else:
                            c = tl.load(cnt_ptr + key)
                            if HL_MODE == 0:
                                c = c + 1.0
                            elif HL_MODE == 1:
                                c = c * 0.0 + 1.0
                            else:
                                last = tl.load(last_ptr + key)
                                delta = tl.where(last > 0, step - last.to(tl.int64), 1)
                                c = 1.0 + tl.exp2(-delta.to(tl.float32) / halflife) * c
                                tl.store(last_ptr + key, step.to(tl.int32))
                            tl.store(cnt_ptr + key, c)
                        scale = ub
                        if TABLE_UB:
                            scale = tl.load(ub_ptr + t)   # the table's ub of this step (between the passes)
                            if UB_ROW_FLOOR:              # a row's ub is at least its own mean_d(d^2)
                                scale = tl.maximum(scale, tl.sum(d * d, axis=0) / Df)
                        if PAPER:
                            scale = scale * (horizon / tl.maximum(stepf, 1.0))   # c T / t = T / p_hat
                        eta = lr / (tl.sqrt_rn(scale * c) + eps)
                        if HAS_LR_MAX:
                            eta = tl.minimum(eta, lr_max)
                        if WARMUP:
                            ssum = tl.load(ada_ptr + key) + tl.sum(d * d, axis=0) / Df
                            tl.store(ada_ptr + key, ssum)
                            if step <= adj_iter:
                                eta = lr / (tl.sqrt_rn(ssum) + eps)
                    lrow = key - tl.load(row_off_ptr + t)
                    wp = w_ptr + tl.load(w_off_ptr + t) + lrow * D + cols
                    wrow = tl.load(wp, mask=cmask, other=0.0)
                    tl.store(wp, wrow - eta * d, mask=cmask)


def update(seg: Segments, grad: Tensor, meta: FeatureMeta, max_dim: int, weights: Tensor, state: Dict[str, Tensor],
           ub_stat: Tensor, step: Tensor, loss: Optional[Tensor], loss_scale: float, cfg: RuleConfig,
           has_shadow: bool, rows_per_prog: int = 4, block_l: int = 32,
           counter_tabs: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Apply one step in place; returns (keys, lambda, updated), n slots each (past U: -1, 0, False).
    ub_mode="table" takes two launches: the first only measures each row's mean_d(d^2), the table
    means join `ub_stat` (torch ops on the device), the second applies the steps with them."""
    n, dev = seg.n, weights.device
    out_key = torch.full((n,), -1, dtype=torch.int64, device=dev)
    out_lam = torch.zeros(n, dtype=torch.float32, device=dev)
    out_upd = torch.zeros(n, dtype=torch.int8, device=dev)
    if n == 0:
        return out_key, out_lam, out_upd.bool()
    scalars, switches = launch_params(cfg)
    empty_f = weights.new_empty(0)
    row_base = meta.row_base if meta.row_base is not None else torch.zeros_like(meta.row_off)
    ctab, cthr = counter_tabs if counter_tabs is not None else (empty_f, torch.empty(0, dtype=torch.int32, device=dev))
    if cfg.compact_counter and not ctab.numel():
        raise ValueError("counter_bytes 2 or 1: pass counter_tabs (rules.counter_tables)")
    args = (seg.key, seg.gaddr, seg.weight, seg.shadow, seg.table, seg.seg_start, seg.num_rows, grad,
            meta.row_off, meta.w_off, meta.dim, row_base, ctab, cthr, weights, state.get("counter", empty_f),
            state.get("last_step", torch.empty(0, dtype=torch.int32, device=dev)), state.get("adagrad_sum", empty_f))
    tail = (step, loss if loss is not None else empty_f, float(loss_scale), out_key, out_lam, out_upd)
    geometric = bool(switches.pop("UB_GEOMETRIC"))      # used by _table_ub (torch ops), not inside the kernel
    consts = dict(**scalars, **switches, HAS_SHADOW=int(has_shadow), ROWS_PER_PROG=rows_per_prog, BLOCK_L=block_l,
                  BLOCK_D=triton.next_power_of_2(max(max_dim, 1)))
    grid = (triton.cdiv(n, rows_per_prog),)
    ub_t = empty_f
    if switches["TABLE_UB"]:
        x = torch.zeros(n, dtype=torch.float32, device=dev)
        _update_rows_kernel[grid](*args, empty_f, x, *tail, **consts, STATS=1)
        ub_t = _table_ub(out_key, out_upd, x, meta.row_bounds, ub_stat, cfg.adjustment_ub, geometric)
    _update_rows_kernel[grid](*args, ub_t, empty_f, *tail, **consts, STATS=0)
    return out_key, out_lam, out_upd.bool()


def _table_ub(keys: Tensor, counted: Tensor, x: Tensor, row_bounds: Tensor, ub_stat: Tensor, adjustment_ub: float,
              geometric: bool = False) -> Tensor:
    """rules.table_ub_update for every table at once: x_t = mean of x over the table's counted rows
    (geometric: exp of the mean log over the counted rows with x > 0) joins (ub_sum, ub_count) when the
    table had any; returns ub per table (float32). The rows come sorted by key, so a table's rows are one
    run: prefix sums, no atomics, same order every time."""
    total_rows = row_bounds[-1:]
    k = torch.where(keys >= 0, keys, total_rows)                 # empty slots sort last
    b = torch.searchsorted(k, row_bounds)
    x64 = x.to(torch.float64)
    w = (counted.bool() & (x64 > 0) if geometric else counted.bool()).to(torch.float64)
    vals = torch.where(w > 0, x64.clamp_min(1e-300).log(), 0.0) if geometric else x64 * w
    zero = w.new_zeros(1)
    cs = torch.cat([zero, torch.cumsum(vals, 0)])
    cn = torch.cat([zero, torch.cumsum(w, 0)])
    xs, nu = cs[b[1:]] - cs[b[:-1]], cn[b[1:]] - cn[b[:-1]]
    has = nu > 0
    mean = xs / nu.clamp_min(1)
    ub_stat[:, 0] += torch.where(has, mean.exp() if geometric else mean, 0.0)
    ub_stat[:, 1] += has.to(torch.float64)
    return (adjustment_ub * ub_stat[:, 0] / ub_stat[:, 1].clamp_min(1)).to(torch.float32)


def interpreted() -> bool:
    """True when this process runs Triton kernels in its interpreter (CPU tensors)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)
