"""Our fused embedding kernel with FBGEMM's TBE interface (no TorchRec imports here).

`TailrecTBE` holds one flat fp32 weight buffer and flat per-row state buffers for the
tables TorchRec grouped into one kernel. Forward pools the local shard's rows
(`F.embedding_bag`); backward aggregates per unique row the main-loss gradient g (from
ordinary features) and the transfer gradient h (from shadow features, names ending in
`RuleConfig.shadow_suffix`) and applies rules.py in place. No dense gradient of the table is
ever built, and autograd receives no weight gradient (it reaches us through a placeholder
tensor that requires grad, as FBGEMM does).

Two implementations of the backward, same results (tests/optim/test_kernel.py):
* a C++ op compiled just in time with torch.utils.cpp_extension (cached under
  $TAILREC_EXT_DIR or ~/.cache/tailrec_ext): table by table, accumulate through an int32 slot
  per local row (prefetched), then update the touched rows in row order; source in
  csrc/tailrec_update.cpp.
* a pure-torch path (per table: unique + index_add_ + rules.apply_step), used when the
  extension cannot be built, when TAILREC_NO_EXT=1, or off CPU.

Step: `step` (int64 buffer) counts backward passes, not forwards, so eval forwards do not
advance it (FBGEMM pitfall 3); it is exposed as optimizer state so checkpoints restore it.
One training step must run exactly one backward through the kernel (main + transfer loss
summed), otherwise rows would be updated twice.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.optim import rules
from trainer.optim.rules import RuleConfig

log = logging.getLogger(__name__)
_EXT: Any = None
_EXT_FAILED = False


CSRC = Path(__file__).with_name("csrc") / "tailrec_update.cpp"


def load_extension(verbose: bool = False) -> Any:
    """Compile (once, cached on disk) and return the C++ op module (csrc/tailrec_update.cpp), or None."""
    global _EXT, _EXT_FAILED
    if _EXT is not None or _EXT_FAILED or os.environ.get("TAILREC_NO_EXT") == "1":
        return _EXT
    try:
        from torch.utils.cpp_extension import load

        # keyed by the torch install too: two venvs sharing ~/.cache would otherwise rebuild each other's op
        tag = hashlib.sha1((CSRC.read_text() + torch.__file__).encode()).hexdigest()[:10]
        root = os.environ.get("TAILREC_EXT_DIR", os.path.expanduser("~/.cache/tailrec_ext"))
        build = os.path.join(root, f"{torch.__version__}-{tag}")
        os.makedirs(build, exist_ok=True)
        _EXT = load(name=f"tailrec_ext_{tag}", sources=[str(CSRC)], build_directory=build,
                    extra_cflags=["-O3"], verbose=verbose)
    except Exception as e:  # no compiler / ninja: the torch path gives the same results
        _EXT_FAILED = True
        log.warning("tailrec C++ kernel unavailable, using the pure-torch path: %s", e)
    return _EXT


class _LookupFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, placeholder, indices, offsets, psw, tbe):  # type: ignore[override]
        ctx.tbe = tbe
        ctx.save_for_backward(indices, offsets, psw if psw is not None else indices.new_empty(0))
        ctx.has_psw = psw is not None
        return tbe.pool(indices, offsets, psw)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        indices, offsets, psw = ctx.saved_tensors
        with torch.no_grad():
            ctx.tbe.update(indices, offsets, psw if ctx.has_psw else None, grad_out)
        return None, None, None, None, None


class TailrecTBE(nn.Module):
    """TBE-like module: forward(indices, offsets, per_sample_weights) -> [B, sum_f D_f]."""

    def __init__(self, rows: List[int], dims: List[int], feature_table_map: List[int],
                 feature_is_shadow: List[bool], cfg: RuleConfig, pooling: str = "sum",
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling {pooling!r} not supported (sum | mean)")
        self.rows, self.dims, self.cfg, self.pooling = list(rows), list(dims), cfg, pooling
        self.feature_table_map = list(feature_table_map)
        self.feature_is_shadow = list(feature_is_shadow)
        self.any_shadow = any(feature_is_shadow)
        self.w_off, self.r_off = _prefix([r * d for r, d in zip(rows, dims)]), _prefix(rows)
        self.col_off = _prefix([dims[t] for t in feature_table_map])
        self.register_buffer("weights", torch.empty(self.w_off[-1], device=device))
        for name, t in rules.init_state(cfg, self.r_off[-1], device).items():
            self.register_buffer(name, t)
        self.register_buffer("step", torch.zeros(1, dtype=torch.int64, device=device))
        # per-table state of ub_mode="table": [table, (ub_sum, ub_count)], float64 (a sum over many steps)
        self.register_buffer("ub_stat", torch.zeros(len(rows) if cfg.table_ub else 0, 2, dtype=torch.float64,
                                                    device=device))
        self._placeholder = torch.zeros(0, device=device, requires_grad=True)
        if self._placeholder.device.type == "cpu":
            load_extension()  # build/load the C++ op now, not inside the first (timed) training step
        self.main_loss: Optional[Any] = None  # float, or anything float() resolves (PendingLoss)
        self.last_stats: Dict[str, Tensor] = {}
        self._meta: Optional[Dict[str, Tensor]] = None
        self._slot: Optional[Tensor] = None

    # ---- TBE interface used by TorchRec's BaseBatchedEmbeddingBag -------------------------
    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor] = None,
                **_: Any) -> Tensor:
        return _LookupFunction.apply(self._placeholder, indices, offsets, per_sample_weights, self)

    def split_embedding_weights(self) -> List[Tensor]:
        return [self.weights[self.w_off[t]:self.w_off[t + 1]].view(r, d)
                for t, (r, d) in enumerate(zip(self.rows, self.dims))]

    def split_state(self, name: str) -> List[Tensor]:
        buf = getattr(self, name)
        return [buf[self.r_off[t]:self.r_off[t + 1]] for t in range(len(self.rows))]

    # ---- duck-typed optimizer API that TorchRec's EmbeddingFusedOptimizer calls ----------
    def get_optimizer_state(self) -> List[Dict[str, Tensor]]:
        per_row = {n: self.split_state(n) for n in self.cfg.state_names()}
        # per-table values as 1-element views: TorchRec treats them as single-value states (like "step")
        per_table = {n: [self.ub_stat[t, i:i + 1] for t in range(len(self.rows))]
                     for i, n in enumerate(self.cfg.table_state_names())}
        return [{**{n: per_row[n][t] for n in per_row}, **{n: per_table[n][t] for n in per_table},
                 "step": self.step} for t in range(len(self.rows))]

    def get_learning_rate(self) -> float:
        return self.cfg.lr

    def set_learning_rate(self, lr: float) -> None:
        if float(lr) != self.cfg.lr:
            self.cfg = _replace(self.cfg, lr=float(lr))

    def set_optimizer_step(self, step: int) -> None:
        self.step.fill_(int(step))

    def update_hyper_parameters(self, params_dict: Dict[str, Any]) -> None:
        known = {k: v for k, v in params_dict.items() if k in RuleConfig.__dataclass_fields__}
        if "lr" in params_dict:
            known["lr"] = float(params_dict["lr"])
        self.cfg = _replace(self.cfg, **known)

    def flush(self) -> None:
        pass

    # ---- compute ------------------------------------------------------------------------
    def _batch(self, offsets: Tensor) -> int:
        nf = len(self.feature_table_map)
        return (offsets.numel() - 1) // nf if nf else 0

    def pool(self, indices: Tensor, offsets: Tensor, psw: Optional[Tensor]) -> Tensor:
        B, outs = self._batch(offsets), []
        W = self.split_embedding_weights()
        for f, t in enumerate(self.feature_table_map):
            o = offsets[f * B:(f + 1) * B + 1]
            s, e = int(o[0]), int(o[-1])
            outs.append(F.embedding_bag(indices[s:e], W[t], o - s, mode=self.pooling,
                                        per_sample_weights=None if psw is None else psw[s:e],
                                        include_last_offset=True))
        return torch.cat(outs, dim=1) if outs else self.weights.new_zeros(B, 0)

    def update(self, indices: Tensor, offsets: Tensor, psw: Optional[Tensor], grad: Tensor) -> None:
        self.step.add_(1)
        if self.cfg.lexico and self.main_loss is None:
            raise RuntimeError("lexico needs the main loss before backward: trainer.optim.set_main_loss")
        if self.cfg.lexico and not isinstance(self.main_loss, float):
            self.main_loss = float(self.main_loss)  # waits for set_main_loss's all-reduce
        ext = load_extension() if self.weights.device.type == "cpu" else None
        if ext is not None:
            keys, lam, upd = self._update_ext(ext, indices, offsets, psw, grad)
        else:
            keys, lam, upd = self._update_torch(indices, offsets, psw, grad)
        self.last_stats = {"rows": keys, "lambda": lam, "updated": upd}

    def _meta_tensors(self, device: torch.device) -> Dict[str, Tensor]:
        if self._meta is None:
            i64 = dict(dtype=torch.int64, device=device)
            self._meta = {
                "feat_table": torch.tensor(self.feature_table_map, **i64),
                "feat_shadow": torch.tensor(self.feature_is_shadow, dtype=torch.bool, device=device),
                "feat_col": torch.tensor(self.col_off[:-1], **i64),
                "row_off": torch.tensor(self.r_off[:-1], **i64),
                "w_off": torch.tensor(self.w_off[:-1], **i64),
                "dim": torch.tensor(self.dims, **i64),
            }
        return self._meta

    def _hyper(self) -> Tuple[List[float], List[int]]:
        c = self.cfg
        step = int(self.step.item())
        # the paper form is the fbgemm form with ub scaled by T / t (rules.cfsgd_lr): the op stays one formula
        ub = c.adjustment_ub * (c.horizon / max(step, 1) if c.counter_form == "paper" and c.horizon > 0 else 1.0)
        hf = [c.lr, c.eps, c.counter_halflife, ub, c.lr_max, c.lexico_alpha,
              c.lexico_lambda_max, c.lexico_h_clip, float(self.main_loss) if c.lexico else 0.0]
        hi = [0 if c.step_rule == "cfsgd" else 1, c.adjustment_iter if c.warmup else -1,
              step, int(c.lexico), int(c.lexico_apply_to_all), int(self.pooling == "mean"), int(c.table_ub),
              int(c.ub_rows == "geometric")]
        return hf, hi

    def _update_ext(self, ext: Any, indices: Tensor, offsets: Tensor, psw: Optional[Tensor],
                    grad: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if self._slot is None:
            self._slot = torch.full((self.r_off[-1],), -1, dtype=torch.int32, device=self.weights.device)
        m, empty = self._meta_tensors(self.weights.device), self.weights.new_empty(0)
        hf, hi = self._hyper()
        state = [getattr(self, n) if hasattr(self, n) else empty for n in ("counter", "last_step", "adagrad_sum")]
        if not hasattr(self, "last_step"):
            state[1] = torch.empty(0, dtype=torch.int32)
        keys, lam, upd = ext.tailrec_update(
            indices.long().contiguous(), offsets.long().contiguous(),
            empty if psw is None else psw.float().contiguous(), grad.float().contiguous(),
            m["feat_table"], m["feat_shadow"], m["feat_col"], m["row_off"], m["w_off"], m["dim"],
            self._slot, self.weights, *state, self.ub_stat, hf, hi)
        return keys, (lam if self.cfg.lexico else None), upd

    def _update_torch(self, indices: Tensor, offsets: Tensor, psw: Optional[Tensor],
                      grad: Tensor) -> Tuple[Tensor, Optional[Tensor], Tensor]:
        keys, lams, upds = [], [], []
        for t in range(len(self.rows)):
            out = self._update_table_torch(t, indices, offsets, psw, grad)
            if out is not None:
                keys.append(out[0] + self.r_off[t])
                lams.append(out[1])
                upds.append(out[2])
        if not keys:
            z = indices.new_zeros(0, dtype=torch.int64)
            return z, None, z.bool()
        lam = torch.cat(lams) if self.cfg.lexico else None
        return torch.cat(keys), lam, torch.cat(upds)

    def _table_grads(self, t: int, indices: Tensor, offsets: Tensor, psw: Optional[Tensor], grad: Tensor):
        """Per-lookup (row, weighted grad, is_shadow) for table t, gathered over its features."""
        B, D = self._batch(offsets), self.dims[t]
        ids, gs, sh = [], [], []
        for f, tt in enumerate(self.feature_table_map):
            if tt != t:
                continue
            o = offsets[f * B:(f + 1) * B + 1].long()
            s, e = int(o[0]), int(o[-1])
            lengths = o[1:] - o[:-1]
            w = torch.ones(e - s, dtype=grad.dtype, device=grad.device) if psw is None else psw[s:e].to(grad.dtype)
            if self.pooling == "mean":
                w = w / lengths.clamp_min(1).to(grad.dtype).repeat_interleave(lengths)
            bag = torch.repeat_interleave(torch.arange(B, device=grad.device), lengths)
            gcol = grad[:, self.col_off[f]:self.col_off[f] + D]
            ids.append(indices[s:e].long())
            gs.append(gcol.index_select(0, bag) * w.unsqueeze(1))
            sh.append(torch.full((e - s,), self.feature_is_shadow[f], dtype=torch.bool, device=grad.device))
        if not ids:
            return None
        return torch.cat(ids), torch.cat(gs), torch.cat(sh)

    def _update_table_torch(self, t: int, indices: Tensor, offsets: Tensor, psw: Optional[Tensor], grad: Tensor):
        got = self._table_grads(t, indices, offsets, psw, grad)
        if got is None or got[0].numel() == 0:
            return None
        ids, gs, sh = got
        uniq, inv = torch.unique(ids, return_inverse=True)
        n, D = uniq.numel(), self.dims[t]
        g = gs.new_zeros(n, D).index_add_(0, inv[~sh], gs[~sh])
        h = has_h = None
        has_main = torch.zeros(n, dtype=torch.bool, device=ids.device).index_fill_(0, inv[~sh], True)
        if self.any_shadow:
            h = gs.new_zeros(n, D).index_add_(0, inv[sh], gs[sh])
            has_h = torch.zeros(n, dtype=torch.bool, device=ids.device).index_fill_(0, inv[sh], True)
        upd = has_main if self.cfg.lexico else torch.ones_like(has_main)
        rows = uniq[upd]
        res = self._apply_rows(t, rows, g[upd], None if h is None else h[upd], None if has_h is None else has_h[upd])
        lam = None
        if res.lam is not None:
            lam = res.lam.new_zeros(n)
            lam[upd] = res.lam
        return uniq, lam, upd

    def _apply_rows(self, t: int, rows: Tensor, g: Tensor, h: Optional[Tensor], has_h: Optional[Tensor]):
        W = self.split_embedding_weights()[t]
        state = {n: s.index_select(0, rows) for n, s in zip(self.cfg.state_names(),
                                                             (self.split_state(n)[t] for n in self.cfg.state_names()))}
        table = {n: self.ub_stat[t, i] for i, n in enumerate(self.cfg.table_state_names())}
        res = rules.apply_step(self.cfg, W.index_select(0, rows), g, state, int(self.step.item()),
                               h=h, has_h=has_h, loss=self.main_loss if self.cfg.lexico else None,
                               table_state=table or None)
        W.index_copy_(0, rows, res.rows)
        for n, v in res.state.items():
            self.split_state(n)[t].index_copy_(0, rows, v)
        for i, n in enumerate(self.cfg.table_state_names()):
            self.ub_stat[t, i] = res.table_state[n]
        return res


def _prefix(xs: List[int]) -> List[int]:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def _replace(cfg: RuleConfig, **kw: Any) -> RuleConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)
