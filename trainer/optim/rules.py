"""Pure per-row update rules of our fused embedding optimizer (no TorchRec here).

The kernel (kernel.py) aggregates, for one global step, the unique rows it owns and calls
`apply_step` with their summed main-loss gradients g [n, d], optional transfer gradients
h [n, d] (+ mask of rows that got one), gathered rows and state. Everything is returned as
new tensors; the caller scatters them back.

Rules (docs/ALGORITHMS.md §1-3):

* Counter (FBGEMM ``rowwise_adagrad_with_counter`` rule, once per step per unique row):
  halflife < 0: c += 1;  == 0: c = 1;  > 0: c = 1 + 2^(-delta/halflife) * c with
  delta = step - last_step (delta = 1 on first touch, last_step == 0).
* Compact counters (``counter_bytes`` 2 or 1, plain counting only): the row keeps a level k (int16 / uint8)
  of an approximate counter (Morris 1978) instead of a float32 count. Estimated count n(k) = (b^k - 1)/(b - 1)
  with b = 2^(1/R), R = 1024 (2 bytes: relative std ~1.8%, range ~6e12) or 8 (1 byte: ~21%, ~4e10); a touch
  raises k by one with probability b^-k, decided by u = (counter_hash(row, step) >> 8) / 2^24, a fixed hash
  of the table-global row and the step (the same under every sharding, reproducible in every backend), so
  E[n(k)] is the exact count. c = n(k) then enters the step size as the count does (docs/COMPACT_COUNTERS.md).
* CF-SGD step size, two forms (``counter_form``):
  - "fbgemm": eta = min(lr_max, lr / (sqrt(ub * c) + eps)), FBGEMM's COUNTER_SGD (the ``+ eps``
    placement is FBGEMM's, kept so our kernel matches it step for step, tested). With c ~ p t it
    decays like 1/sqrt(t) for every row.
  - "paper" (Li et al. 2021: eta_k = min(eta_max, alpha / sqrt(T p_hat_k)), p_hat_k = c_k / t):
    eta = min(lr_max, lr / (sqrt(ub * c * T / t) + eps)) with T = ``horizon`` (the planned number of
    steps; 0 = use t, which gives the fbgemm form). A row seen at a steady rate keeps a constant step.
  c >= 1 after the update, so eps is never needed for safety.
* Gradient-scale prior ub (``ub_mode``): FBGEMM's ``adjustment_ub`` is a fixed prior on the mean squared
  gradient ("fixed"). "table" (ours) estimates it per table: ub = adjustment_ub * mean over the steps
  that touched the table of x_t, x_t = the mean over the rows updated at step t of mean_d(d^2) (d the
  applied direction). Then eta = lr / sqrt(ub c) is rowwise Adagrad's lr / sqrt(sum of mean_d d^2) with
  each row's own sum replaced by (its count) x (the table's mean square): the step no longer depends on
  the loss scale, batch size or world size, so one lr carries over; per-row state stays the counter,
  plus two floats per table. ``ub_rows`` sets how the rows of one step are averaged into x_t:
  "arithmetic" (the mean; frequent rows, whose summed gradients are the largest, dominate it) or
  "geometric" (exp of the mean log over the rows with d != 0: the typical row, so the many rare rows set
  the scale and get Adagrad-sized steps). ``ub_row_floor``: a row's ub is at least its own mean_d(d^2) of
  this step, so a row whose summed gradient is far above the table's typical one (a frequent id, many
  occurrences in the batch) takes a normalised step (at most lr / sqrt(c) in RMS), as rowwise Adagrad's
  first step does; it costs no state.
* Warm-up (adjustment_iter > 0): while step <= adjustment_iter the row uses rowwise Adagrad
  (as FBGEMM: "adjust only when iter > adjustment_iter"). Needs the Adagrad sum, so that
  state is only allocated when warm-up is configured.
* Rowwise Adagrad: s += mean_d(d^2) over the applied direction d; eta = lr / (sqrt(s) + eps).
* Item-wise lexico (harmless-transfer Algorithm 1), see `lexico_direction`.
* Composition: e <- e - eta * d with d = h + lambda * g (or g when lexico is off).

State bytes per row: cfsgd 4 (float32 counter; 2 or 1 with ``counter_bytes``) [+4 last_step when
halflife > 0] [+4 Adagrad sum when warm-up]; rowwise_adagrad 4 (sum). FBGEMM COUNTER_SGD keeps 12.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from trainer.optim.names import COUNTER_BYTES, COUNTER_FORMS, STEP_RULES, UB_MODES, UB_ROWS

# Only guards the division when ||g||^2 underflows; rows with g == 0 are handled explicitly,
# so for every other row lambda is exact and the barrier constraint holds.
_TINY = 1e-30


@dataclass(frozen=True)
class RuleConfig:
    """Hyper-parameters of one table's update. Frozen + hashable: it rides in TorchRec
    fused_params, which TorchRec hashes to group tables."""

    step_rule: str = "cfsgd"
    lr: float = 0.01
    eps: float = 1e-8
    counter_halflife: float = -1.0
    counter_form: str = "fbgemm"      # "fbgemm" | "paper" (see the module docstring)
    horizon: int = 0                  # T of the paper form, in steps; 0 = t (the fbgemm form)
    adjustment_ub: float = 1.0
    adjustment_iter: int = -1
    lr_max: float = math.inf
    lexico: bool = False
    lexico_alpha: float = 2.0
    lexico_lambda_max: float = math.inf   # no cap: the paper has none, and a capped row can break the barrier
    lexico_h_clip: float = 0.0
    # Rows without a transfer gradient: True = faithful Algorithm 1 (lambda from h = 0),
    # False = plain main gradient (lambda = 1). docs/ALGORITHMS.md §3 edge case 2.
    lexico_apply_to_all: bool = True
    ub_mode: str = "fixed"            # "fixed": adjustment_ub | "table": adjustment_ub x the table's mean d^2
    ub_rows: str = "arithmetic"       # how a step's rows are averaged into x_t: arithmetic | geometric
    ub_row_floor: bool = False        # per row: ub >= the row's own mean_d(d^2) of this step
    counter_bytes: int = 4            # 4: float32 count | 2, 1: approximate (Morris) counter level
    shadow_suffix: str = "__shadow"

    def __post_init__(self) -> None:
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"step_rule {self.step_rule!r} not in {STEP_RULES}")
        if self.lr <= 0 or self.adjustment_ub <= 0:
            raise ValueError("lr and adjustment_ub must be positive")
        if self.counter_form not in COUNTER_FORMS:
            raise ValueError(f"counter_form {self.counter_form!r} not in {COUNTER_FORMS}")
        if self.horizon < 0:
            raise ValueError("horizon must be >= 0")
        if self.ub_mode not in UB_MODES:
            raise ValueError(f"ub_mode {self.ub_mode!r} not in {UB_MODES}")
        if self.ub_rows not in UB_ROWS:
            raise ValueError(f"ub_rows {self.ub_rows!r} not in {UB_ROWS}")
        if self.counter_bytes not in COUNTER_BYTES:
            raise ValueError(f"counter_bytes {self.counter_bytes!r} not in {COUNTER_BYTES}")
        if self.compact_counter and self.counter_halflife >= 0:
            raise ValueError("counter_bytes 2 or 1 counts plainly: it needs counter_halflife < 0")

    @property
    def compact_counter(self) -> bool:
        return self.step_rule == "cfsgd" and self.counter_bytes != 4

    @property
    def warmup(self) -> bool:
        return self.step_rule == "cfsgd" and self.adjustment_iter > 0

    def state_names(self) -> Tuple[str, ...]:
        """Per-row state tensors, in the order the kernel exposes them. TorchRec's
        EmbeddingFusedOptimizer names the first one ``momentum1`` whatever it is."""
        if self.step_rule == "rowwise_adagrad":
            return ("adagrad_sum",)
        names = ("counter",)
        if self.counter_halflife > 0:
            names += ("last_step",)
        if self.warmup:
            names += ("adagrad_sum",)
        return names

    def state_bytes_per_row(self) -> int:
        return sum(torch.empty(0, dtype=state_dtype(self, n)).element_size() for n in self.state_names())

    @property
    def table_ub(self) -> bool:
        return self.step_rule == "cfsgd" and self.ub_mode == "table"

    def table_state_names(self) -> Tuple[str, ...]:
        """Per-table (not per-row) state: the running sum and count of x_t for ub_mode="table"."""
        return ("ub_sum", "ub_count") if self.table_ub else ()


def rule_config_from(cfg: Any, **overrides: Any) -> RuleConfig:
    """Build from trainer.config.EmbOptimConfig (duck-typed to keep this module pure)."""
    if cfg.name not in STEP_RULES:
        raise ValueError(f"optimizer {cfg.name!r} is not one of our rules {STEP_RULES}")
    if getattr(cfg, "weight_decay", 0.0):
        raise ValueError("weight_decay is not supported by our fused kernel (set it to 0)")
    kw = dict(
        step_rule=cfg.name, lr=float(cfg.lr), eps=float(cfg.eps),
        counter_halflife=float(cfg.counter_halflife), adjustment_ub=float(cfg.adjustment_ub),
        counter_form=str(getattr(cfg, "counter_form", "fbgemm")), horizon=int(getattr(cfg, "horizon", 0)),
        adjustment_iter=int(cfg.adjustment_iter), lr_max=float(cfg.lr_max),
        lexico=bool(cfg.lexico), lexico_alpha=float(cfg.lexico_alpha),
        lexico_lambda_max=float(cfg.lexico_lambda_max), lexico_h_clip=float(cfg.lexico_h_clip),
        ub_mode=str(getattr(cfg, "ub_mode", "fixed")), ub_rows=str(getattr(cfg, "ub_rows", "arithmetic")),
        ub_row_floor=bool(getattr(cfg, "ub_row_floor", False)),
        counter_bytes=int(getattr(cfg, "counter_bytes", 4)),
    )
    if hasattr(cfg, "lexico_apply_to_all"):
        kw["lexico_apply_to_all"] = bool(cfg.lexico_apply_to_all)
    kw.update(overrides)
    return RuleConfig(**kw)


def state_dtype(cfg: RuleConfig, name: str) -> torch.dtype:
    if name == "counter":
        return {4: torch.float32, 2: torch.int16, 1: torch.uint8}[cfg.counter_bytes]
    return {"last_step": torch.int32, "adagrad_sum": torch.float32}[name]


def init_state(cfg: RuleConfig, num_rows: int, device: Optional[torch.device] = None) -> Dict[str, Tensor]:
    return {n: torch.zeros(num_rows, dtype=state_dtype(cfg, n), device=device) for n in cfg.state_names()}


# ------------------------------------------------------------------ compact (approximate) counters
# levels per counter width (the dtype's largest value) and R of the base b = 2^(1/R)
COUNTER_LEVELS = {2: (32767, 1024), 1: (255, 8)}
_M32 = 0xFFFFFFFF


def counter_hash(row: Tensor, step: Tensor | int) -> Tensor:
    """32-bit hash of (table-global row, step) as int64 in [0, 2^32). Every product stays below 2^63
    (multipliers < 2^31 on 32-bit values), so int64 tensors, C++ uint32 and Triton compute the same bits."""
    x = ((row & _M32) * 0x27D4EB2D + (torch.as_tensor(step, dtype=torch.int64, device=row.device) & _M32)) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def counter_tables(counter_bytes: int, device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
    """(count, threshold) per level k: n(k) = (b^k - 1)/(b - 1) as float32, and the integer threshold
    ceil(2^24 b^-k): a touch raises k iff (counter_hash >> 8) < threshold[k], i.e. u < b^-k with
    u = (hash >> 8) / 2^24. Computed in float64 once; the kernels only look them up."""
    kmax, r = COUNTER_LEVELS[counter_bytes]
    k = torch.arange(kmax + 1, dtype=torch.float64)
    count = torch.expm1(k * math.log(2.0) / r) / math.expm1(math.log(2.0) / r)
    thr = torch.ceil(torch.exp2(24.0 - k / r))
    thr[-1] = 0                                   # saturated: never raised again
    return count.float().to(device), thr.to(torch.int32).to(device)


def update_compact_counter(cfg: RuleConfig, level: Tensor, rows: Tensor, step: int,
                           tables: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Rows touched at ``step``: (new level, estimated count). ``rows`` are table-global row indices."""
    count, thr = tables if tables is not None else counter_tables(cfg.counter_bytes, level.device)
    k = level.long()
    raise_ = (counter_hash(rows.long(), step) >> 8) < thr.index_select(0, k).long()
    k = k + raise_.long()
    return k.to(level.dtype), count.index_select(0, k)


def update_counter(cfg: RuleConfig, counter: Tensor, last_step: Optional[Tensor], step: int
                   ) -> Tuple[Tensor, Optional[Tensor]]:
    """FBGEMM's counter rule for rows touched at `step` (1-based global step)."""
    hl = cfg.counter_halflife
    if hl < 0:
        return counter + 1, last_step
    if hl == 0:
        return torch.ones_like(counter), last_step
    assert last_step is not None, "halflife > 0 needs last_step state"
    delta = torch.where(last_step > 0, step - last_step, torch.ones_like(last_step))
    decay = torch.exp2(-delta.to(counter.dtype) / hl)
    return 1.0 + decay * counter, torch.full_like(last_step, step)


def cfsgd_lr(cfg: RuleConfig, counter: Tensor, step: int = 1, ub: Optional[Tensor] = None) -> Tensor:
    """Per-row step size from the updated counters at global ``step`` (>= 1); ``ub`` overrides
    ``adjustment_ub`` (the table's estimate, ub_mode="table")."""
    scale = cfg.adjustment_ub if ub is None else ub
    if cfg.counter_form == "paper" and cfg.horizon > 0:
        scale = scale * cfg.horizon / max(int(step), 1)   # ub * T / t:  c T / t = T / p_hat
    eta = cfg.lr / ((scale * counter).sqrt() + cfg.eps)
    return eta.clamp_max(cfg.lr_max) if math.isfinite(cfg.lr_max) else eta


def table_ub_update(cfg: RuleConfig, table_state: Dict[str, Tensor], d: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
    """ub_mode="table": fold this step's x_t into the table's running mean; x_t = mean over the rows of
    mean_d(d^2) (``ub_rows="arithmetic"``) or exp(mean over the rows with d != 0 of log mean_d(d^2))
    ("geometric"). Returns (ub, new table state); a step with no (non-zero) rows leaves the state as it is."""
    per_row = d.double().square().mean(1) if d.shape[0] else d.new_zeros(0, dtype=torch.float64)
    if cfg.ub_rows == "geometric":
        per_row = per_row[per_row > 0]
    total, n = table_state["ub_sum"], table_state["ub_count"]
    if per_row.shape[0]:
        x = per_row.log().mean().exp() if cfg.ub_rows == "geometric" else per_row.mean()
        total, n = total + x, n + 1
    return cfg.adjustment_ub * total / n.clamp_min(1), {"ub_sum": total, "ub_count": n}


def adagrad_update(cfg: RuleConfig, ssum: Tensor, direction: Tensor) -> Tuple[Tensor, Tensor]:
    """Returns (new sum, eta) for rowwise Adagrad over the applied direction."""
    new_sum = ssum + direction.square().mean(dim=1)
    return new_sum, cfg.lr / (new_sum.sqrt() + cfg.eps)


@dataclass
class LexicoResult:
    direction: Tensor   # [n, d]  h + lambda * g (masked / clipped as documented)
    lam: Tensor         # [n]     lambda per row (1 for plain-g rows when apply_to_all=False)
    phi: Tensor         # [n]     barrier alpha * min(||g||^2, loss)


def lexico_direction(cfg: RuleConfig, g: Tensor, h: Tensor, has_h: Tensor, loss: float) -> LexicoResult:
    """Item-wise dynamic barrier: d = h + lambda g with <d, g> >= phi (unless lambda is capped).

    Edge cases (docs/ALGORITHMS.md §3): ||g|| = 0 -> h masked, d = 0 (harmlessness cannot be
    certified); rows without transfer gradient -> faithful (h = 0) or plain g per
    `lexico_apply_to_all`; optional ||h|| <= h_clip * ||g|| before lambda is computed.
    """
    gg = g.square().sum(1)
    g_zero = gg == 0
    h = torch.where(has_h.unsqueeze(1) & ~g_zero.unsqueeze(1), h, torch.zeros_like(h))
    if cfg.lexico_h_clip > 0:
        hn = h.norm(dim=1)
        cap = cfg.lexico_h_clip * gg.sqrt()
        h = h * torch.where(hn > cap, cap / hn.clamp_min(_TINY), torch.ones_like(hn)).unsqueeze(1)
    phi = cfg.lexico_alpha * torch.clamp(gg, max=max(float(loss), 0.0))
    lam = ((phi - (h * g).sum(1)) / gg.clamp_min(_TINY)).clamp(0.0, cfg.lexico_lambda_max)
    if not cfg.lexico_apply_to_all:
        lam = torch.where(has_h, lam, torch.ones_like(lam))
    lam = torch.where(g_zero, torch.zeros_like(lam), lam)
    return LexicoResult(direction=h + lam.unsqueeze(1) * g, lam=lam, phi=phi)


@dataclass
class StepResult:
    rows: Tensor                 # updated rows [n, d]
    state: Dict[str, Tensor]     # updated per-row state (same keys as given)
    eta: Tensor                  # per-row step size [n]
    lam: Optional[Tensor]        # lexico lambda [n] or None
    table_state: Optional[Dict[str, Tensor]] = None   # per-table state (ub_mode="table")


def apply_step(cfg: RuleConfig, rows: Tensor, g: Tensor, state: Dict[str, Tensor], step: int,
               h: Optional[Tensor] = None, has_h: Optional[Tensor] = None,
               loss: Optional[float] = None, table_state: Optional[Dict[str, Tensor]] = None,
               row_ids: Optional[Tensor] = None,
               counter_tabs: Optional[Tuple[Tensor, Tensor]] = None) -> StepResult:
    """One optimizer step for the n unique rows touched at global `step` (>= 1), all of one table.

    Without lexico the direction is g (+ h when a transfer stream exists: plain "+T" sum).
    ``table_state`` (0-d float64 ``ub_sum`` / ``ub_count``) is required with ub_mode="table".
    ``row_ids`` (the rows' table-global indices) is required with compact counters (their hash);
    ``counter_tabs`` caches ``counter_tables``.
    """
    lam = None
    if cfg.lexico:
        if h is None:
            h, has_h = torch.zeros_like(g), torch.zeros(g.shape[0], dtype=torch.bool, device=g.device)
        if loss is None:
            raise ValueError("lexico needs the scalar main loss (trainer.optim.set_main_loss)")
        res = lexico_direction(cfg, g, h, has_h, loss)
        d, lam = res.direction, res.lam
    else:
        d = g if h is None else g + h
    new_state, ub, new_table = dict(state), None, None
    if cfg.table_ub:
        if table_state is None:
            raise ValueError("ub_mode='table' needs the table's state (ub_sum, ub_count)")
        ub, new_table = table_ub_update(cfg, table_state, d)
        if cfg.ub_row_floor:
            ub = torch.maximum(ub, d.double().square().mean(1))
    eta = _step_size(cfg, new_state, d, step, ub, row_ids, counter_tabs)
    return StepResult(rows=rows - eta.unsqueeze(1).to(rows.dtype) * d.to(rows.dtype),
                      state=new_state, eta=eta, lam=lam, table_state=new_table)


def _step_size(cfg: RuleConfig, state: Dict[str, Tensor], d: Tensor, step: int, ub: Optional[Tensor] = None,
               row_ids: Optional[Tensor] = None, counter_tabs: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """Updates `state` (a fresh dict) in place of its entries and returns eta [n]."""
    if cfg.step_rule == "rowwise_adagrad":
        state["adagrad_sum"], eta = adagrad_update(cfg, state["adagrad_sum"], d)
        return eta
    if cfg.compact_counter:
        if row_ids is None:
            raise ValueError("counter_bytes 2 or 1 needs the rows' table-global indices (row_ids)")
        state["counter"], c = update_compact_counter(cfg, state["counter"], row_ids, step, counter_tabs)
        c = c.to(d.dtype if d.is_floating_point() else torch.float32)
    else:
        state["counter"], last = update_counter(cfg, state["counter"], state.get("last_step"), step)
        if last is not None:
            state["last_step"] = last
        c = state["counter"]
    eta = cfsgd_lr(cfg, c, step, None if ub is None else ub.to(c.dtype))
    if cfg.warmup:
        # FBGEMM keeps the Adagrad sum current in every step, warm-up or not.
        state["adagrad_sum"], eta_ada = adagrad_update(cfg, state["adagrad_sum"], d)
        if step <= cfg.adjustment_iter:
            eta = eta_ada
    return eta
