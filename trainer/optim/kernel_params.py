"""RuleConfig -> the arguments of our compiled update kernels (the C++ op and the Triton kernel).

The one place that turns hyper-parameters into kernel arguments: `scalars` are runtime values,
`switches` select code paths (Triton compile-time constants; ints for the C++ op). A new
RuleConfig option becomes an entry here plus its use in both kernels; the pure-torch path reads
RuleConfig through rules.py directly.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

from trainer.optim.rules import RuleConfig

SCALARS = ("lr", "eps", "halflife", "ub", "horizon", "lr_max", "alpha", "lam_max", "h_clip", "adj_iter")
SWITCHES = ("ADAGRAD", "HL_MODE", "PAPER", "HAS_LR_MAX", "WARMUP", "LEXICO", "HAS_LAM_MAX", "H_CLIP", "APPLY_ALL",
            "TABLE_UB", "UB_GEOMETRIC", "UB_ROW_FLOOR", "COUNTER_BYTES")


def launch_params(cfg: RuleConfig) -> Tuple[Dict[str, float], Dict[str, int]]:
    """(runtime scalars, switches) for one RuleConfig (module docstring of rules.py for the maths)."""
    hl = cfg.counter_halflife
    scalars = dict(
        lr=cfg.lr, eps=cfg.eps, halflife=hl if hl > 0 else 1.0, ub=cfg.adjustment_ub, horizon=float(cfg.horizon),
        lr_max=cfg.lr_max if math.isfinite(cfg.lr_max) else 0.0, alpha=cfg.lexico_alpha,
        lam_max=cfg.lexico_lambda_max if math.isfinite(cfg.lexico_lambda_max) else 0.0,
        h_clip=cfg.lexico_h_clip, adj_iter=cfg.adjustment_iter)
    switches = dict(
        ADAGRAD=int(cfg.step_rule == "rowwise_adagrad"),
        HL_MODE=0 if hl < 0 else (1 if hl == 0 else 2),               # c += 1 | c = 1 | c = 1 + 2^(-delta/hl) c
        PAPER=int(cfg.counter_form == "paper" and cfg.horizon > 0),   # ub -> ub * T / t
        HAS_LR_MAX=int(math.isfinite(cfg.lr_max)),
        WARMUP=int(cfg.warmup),
        LEXICO=int(cfg.lexico),
        HAS_LAM_MAX=int(math.isfinite(cfg.lexico_lambda_max)),
        H_CLIP=int(cfg.lexico_h_clip > 0),
        APPLY_ALL=int(cfg.lexico_apply_to_all),
        TABLE_UB=int(cfg.table_ub),       # ub = adjustment_ub x the table's running mean of mean_d(d^2)
        UB_GEOMETRIC=int(cfg.table_ub and cfg.ub_rows == "geometric"),   # x_t: geometric mean over the rows
        UB_ROW_FLOOR=int(cfg.table_ub and cfg.ub_row_floor),              # per row: ub >= its own mean_d(d^2)
        COUNTER_BYTES=cfg.counter_bytes if cfg.compact_counter else 4,    # 2 / 1: approximate counter level
    )
    assert tuple(scalars) == SCALARS and tuple(switches) == SWITCHES
    return scalars, switches


def cpp_params(cfg: RuleConfig) -> Tuple[List[float], List[int]]:
    """The same values as two flat lists, in SCALARS / SWITCHES order (csrc/tailrec_update.cpp: Hyper)."""
    scalars, switches = launch_params(cfg)
    return [float(scalars[k]) for k in SCALARS], [int(switches[k]) for k in SWITCHES]
