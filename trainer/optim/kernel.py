"""Our fused embedding kernel with FBGEMM's TBE interface (no TorchRec imports here).

`TailrecTBE` holds one flat fp32 weight buffer and flat per-row state buffers for the
tables TorchRec grouped into one kernel. Forward pools the local shard's rows with FBGEMM's own
table-batched lookup (`dense_embedding_codegen_lookup_function`: all features in one call, mixed
dims, on CPU and CUDA); backward aggregates per unique row the main-loss gradient g (from
ordinary features) and the transfer gradient h (from shadow features, names ending in
`RuleConfig.shadow_suffix`) and applies rules.py in place. No dense gradient of the table is
ever built, and autograd receives no weight gradient (it reaches us through a placeholder
tensor that requires grad, as FBGEMM does).

Three implementations of the backward, same results (tests/optim: each against the float64
formulas of tests/optim/reference.py), picked per device by `backend` ($TAILREC_KERNEL overrides):
* "triton" (CUDA): segments.sort_lookups sorts the lookups by row, then triton_update.py runs one
  program per block of unique rows (FBGEMM's GPU backward layout). Also runs on CPU tensors in
  Triton's interpreter (TRITON_INTERPRET=1, tests only).
* "cpp" (CPU): a C++ op compiled once with torch.utils.cpp_extension and cached under
  $TAILREC_EXT_DIR or ~/.cache/tailrec_ext (`make setup` and the Docker image build it ahead of
  time: python -m trainer.optim.build_ext); source in csrc/tailrec_update.cpp.
* "torch": the pure-torch fallback (sorted segments + index_add_ + rules.apply_step), used when
  neither compiled kernel is available. It is the only path with data-dependent shapes, so on an
  accelerator it waits on the host; the two compiled paths never do.

No host sync in a step: the step counter, the number of unique rows and the main loss stay device
tensors that the compiled kernels read themselves; `last_stats` keeps device tensors that only
`kernel_stats` (every N steps) reads.

Step: `step` (int64 buffer) counts backward passes, not forwards, so eval forwards do not
advance it (FBGEMM pitfall 3); it is exposed as optimizer state so checkpoints restore it.
One training step must run exactly one backward through the kernel (main + transfer loss
summed), otherwise rows would be updated twice.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from trainer.optim import kernel_params, rules
from trainer.optim.rules import RuleConfig
from trainer.optim.segments import FeatureMeta, Segments, sort_lookups

log = logging.getLogger(__name__)
_EXT: Any = None
_EXT_FAILED = False
BACKENDS = ("auto", "triton", "cpp", "torch")

CSRC = Path(__file__).with_name("csrc") / "tailrec_update.cpp"


def ext_build_dir() -> Tuple[str, str]:
    """(module name, build directory) of the C++ op for this source and torch install."""
    # keyed by the torch install too: two venvs sharing ~/.cache would otherwise rebuild each other's op
    tag = hashlib.sha1((CSRC.read_text() + torch.__file__ + torch.__version__).encode()).hexdigest()[:10]
    root = os.environ.get("TAILREC_EXT_DIR", os.path.expanduser("~/.cache/tailrec_ext"))
    return f"tailrec_ext_{tag}", os.path.join(root, f"{torch.__version__}-{tag}")


def load_extension(verbose: bool = False) -> Any:
    """Return the C++ op module (csrc/tailrec_update.cpp), compiling it once if no build is cached;
    None when it cannot be built (the torch path gives the same results, slower)."""
    global _EXT, _EXT_FAILED
    if _EXT is not None or _EXT_FAILED or os.environ.get("TAILREC_NO_EXT") == "1":
        return _EXT
    name, build = ext_build_dir()
    so = os.path.join(build, f"{name}.so")
    try:
        if os.path.exists(so):  # built before (make setup, the image, an earlier run): no ninja, no compiler
            spec = importlib.util.spec_from_loader(name, importlib.machinery.ExtensionFileLoader(name, so))
            assert spec is not None and spec.loader is not None
            _EXT = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(_EXT)
            return _EXT
        from torch.utils.cpp_extension import load

        os.makedirs(build, exist_ok=True)
        log.warning("compiling the tailrec C++ kernel into %s (once per machine and torch install; "
                    "about 1-2 minutes; `make setup` does it ahead of time)", build)
        t0 = time.perf_counter()
        _EXT = load(name=name, sources=[str(CSRC)], build_directory=build, extra_cflags=["-O3"], verbose=verbose)
        log.warning("tailrec C++ kernel compiled in %.0f s", time.perf_counter() - t0)
    except Exception as e:  # no compiler / ninja: the torch path gives the same results
        _EXT_FAILED = True
        log.warning("tailrec C++ kernel unavailable, using the pure-torch path (slower): %s", e)
    return _EXT


def backend(device: torch.device) -> str:
    """Which backward runs on `device`: $TAILREC_KERNEL (triton | cpp | torch), else CUDA -> triton,
    CPU -> cpp (if it builds), anything else -> torch."""
    want = os.environ.get("TAILREC_KERNEL", "auto")
    if want not in BACKENDS:
        raise ValueError(f"TAILREC_KERNEL={want!r} is not one of {BACKENDS}")
    if want != "auto":
        return want
    if device.type == "cuda":
        return "triton" if _triton() is not None else "torch"
    if device.type == "cpu":
        return "cpp" if load_extension() is not None else "torch"
    return "torch"


def _triton(required: bool = False) -> Any:
    try:
        from trainer.optim import triton_update
    except ImportError as e:
        if required:
            raise RuntimeError(f"TAILREC_KERNEL=triton but Triton does not import: {e}") from e
        return None
    return triton_update


class MainLoss:
    """The main loss for lexico's barrier as a device tensor, possibly with its all-reduce in flight.

    `tensor()` waits for the collective inside the stream (NCCL: the compute stream waits on the
    collective's, the host does not), so the kernel reads the reduced sum and applies `scale`
    (1 / world size) itself: the host never reads the loss in a step."""

    def __init__(self, val: Tensor, work: Any = None, scale: float = 1.0) -> None:
        self._val, self._work, self.scale = val, work, scale

    def tensor(self) -> Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._val


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
                 device: Optional[torch.device] = None, row_base: Optional[List[int]] = None) -> None:
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
        # compact counters: each table's first row in the whole table (a row_wise shard's offset), so the
        # counter's hash sees table-global rows under every sharding; and the level -> count / threshold
        # tables (derived from the config: not state, not checkpointed)
        self.row_base = list(row_base) if row_base is not None else [0] * len(rows)
        ctabs = rules.counter_tables(cfg.counter_bytes, device) if cfg.compact_counter else (
            torch.zeros(0, device=device), torch.zeros(0, dtype=torch.int32, device=device))
        self.register_buffer("counter_count", ctabs[0], persistent=False)
        self.register_buffer("counter_thr", ctabs[1], persistent=False)
        # per-table state of ub_mode="table": [table, (ub_sum, ub_count)], float64 (a sum over many steps)
        self.register_buffer("ub_stat", torch.zeros(len(rows) if cfg.table_ub else 0, 2, dtype=torch.float64,
                                                    device=device))
        self._placeholder = torch.zeros(0, device=device, requires_grad=True)
        # build/load the compiled op now, not inside the first (timed) training step
        self.backend = backend(self._placeholder.device)
        if self.backend == "triton":
            tu = _triton(required=True)
            if self._placeholder.device.type != "cuda" and not tu.interpreted():
                raise RuntimeError("TAILREC_KERNEL=triton off CUDA runs only in Triton's interpreter: set "
                                   "TRITON_INTERPRET=1 before trainer.optim.triton_update is imported")
        self.main_loss: Optional[Any] = None  # MainLoss (set_main_loss), or a float (tests)
        self._stats: Dict[str, Optional[Tensor]] = {}
        self._meta: Optional[FeatureMeta] = None
        self._fwd: Optional[Dict[str, Any]] = None
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
        """Per-row state, as TorchRec's fused optimizer exports (and DCP reshards) it. Single values are
        not among them: TorchRec saves those as one value per shard, which cannot load into another
        sharding (a row_wise table saved by 2 ranks, evaluated on 1). The step is the trainer's global
        step (set_optimizer_step after a restore); ub_mode="table"'s per-shard estimates go into the
        trainer's checkpoint metadata (torchrec_adapter.ub_state)."""
        per_row = {n: self.split_state(n) for n in self.cfg.state_names()}
        return [{n: per_row[n][t] for n in per_row} for t in range(len(self.rows))]

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
    def _forward_meta(self, device: torch.device) -> Dict[str, Any]:
        """FBGEMM's per-feature TBE layout (as DenseTableBatchedEmbeddingBagsCodegen builds it)."""
        if self._fwd is None:
            ftm = self.feature_table_map
            total = self.r_off[-1]
            self._fwd = dict(
                weights_offsets=torch.tensor([self.w_off[t] for t in ftm], dtype=torch.int64, device=device),
                D_offsets=torch.tensor(self.col_off, dtype=torch.int32, device=device),
                total_D=self.col_off[-1], max_D=max(self.dims) if self.dims else 0,
                hash_size_cumsum=torch.tensor([self.r_off[t] for t in ftm] + [total], dtype=torch.int64,
                                              device=device),
                total_hash_size_bits=int(total).bit_length() if total else 0,
                pooling_mode=1 if self.pooling == "mean" else 0)   # fbgemm PoolingMode.SUM / MEAN
        return self._fwd

    def pool(self, indices: Tensor, offsets: Tensor, psw: Optional[Tensor]) -> Tensor:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

        if not self.feature_table_map:
            return self.weights.new_zeros(offsets.numel() - 1, 0)
        return torch.ops.fbgemm.dense_embedding_codegen_lookup_function(
            dev_weights=self.weights, indices=indices, offsets=offsets.to(indices.dtype),
            indice_weights=None if psw is None else psw.float(), feature_requires_grad=None,
            output_dtype=0, **self._forward_meta(self.weights.device))

    def update(self, indices: Tensor, offsets: Tensor, psw: Optional[Tensor], grad: Tensor) -> None:
        self.step.add_(1)
        loss, scale = None, 1.0
        if self.cfg.lexico:
            if self.main_loss is None:
                raise RuntimeError("lexico needs the main loss before backward: trainer.optim.set_main_loss")
            ml = self.main_loss if isinstance(self.main_loss, MainLoss) else MainLoss(
                torch.tensor([float(self.main_loss)], dtype=torch.float32, device=self.weights.device))
            loss, scale = ml.tensor(), ml.scale
        grad = grad.float()
        if grad.dim() != 2 or grad.stride(1) != 1:
            grad = grad.contiguous()   # a column slice (TorchRec splits one output among kernels) is used in place
        if self.backend == "cpp":
            ext = load_extension()
            assert ext is not None, "TAILREC_KERNEL=cpp but the C++ op does not build (see the warning above)"
            keys, lam, upd = self._update_ext(ext, indices, offsets, psw, grad, loss, scale)
        else:
            seg = sort_lookups(indices, offsets, psw, grad, self._meta_tensors(), self.pooling == "mean",
                               self.r_off[-1])
            if self.backend == "triton":
                keys, lam, upd = self._update_triton(seg, grad, loss, scale)
            else:
                keys, lam, upd = self._update_torch(seg, grad, loss, scale)
        self._stats = {"rows": keys, "lambda": lam if self.cfg.lexico else None, "updated": upd}

    @property
    def last_stats(self) -> Dict[str, Optional[Tensor]]:
        """Rows of the last step (global keys, row order), their lambda (lexico) and whether they were
        updated. The step keeps one slot per lookup on the device (-1 past the unique rows); trimming
        them reads the count on the host, so call this every N steps (kernel_stats), not per step."""
        st = self._stats
        if not st or st["rows"] is None:
            return st
        keep = st["rows"] >= 0
        return {k: (None if v is None else v[keep]) for k, v in st.items()}

    def _meta_tensors(self) -> FeatureMeta:
        if self._meta is None:
            i64 = dict(dtype=torch.int64, device=self.weights.device)
            self._meta = FeatureMeta(
                feat_table=torch.tensor(self.feature_table_map, **i64),
                feat_shadow=torch.tensor(self.feature_is_shadow, dtype=torch.bool, device=self.weights.device),
                feat_col=torch.tensor(self.col_off[:-1], **i64),
                row_off=torch.tensor(self.r_off[:-1], **i64),
                w_off=torch.tensor(self.w_off[:-1], **i64),
                dim=torch.tensor(self.dims, **i64),
                row_bounds=torch.tensor(self.r_off, **i64),
                row_base=torch.tensor(self.row_base, **i64))
        return self._meta

    def counter_estimate(self, keys: Tensor) -> Tensor:
        """CF-SGD's count of the rows at these global keys (a compact counter's level decoded)."""
        c = self.counter.index_select(0, keys)
        return self.counter_count.index_select(0, c.long()) if self.cfg.compact_counter else c

    def _state(self) -> Dict[str, Tensor]:
        return {n: getattr(self, n) for n in self.cfg.state_names()}

    def _update_ext(self, ext: Any, indices: Tensor, offsets: Tensor, psw: Optional[Tensor], grad: Tensor,
                    loss: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor, Tensor]:
        if self._slot is None:
            self._slot = torch.full((self.r_off[-1],), -1, dtype=torch.int32, device=self.weights.device)
        m, empty = self._meta_tensors(), self.weights.new_empty(0)
        hf, hi = kernel_params.cpp_params(self.cfg)
        st = self._state()
        return ext.tailrec_update(
            indices.long().contiguous(), offsets.long().contiguous(),
            empty if psw is None else psw.float().contiguous(), grad,
            m.feat_table, m.feat_shadow, m.feat_col, m.row_off, m.w_off, m.dim, self._slot, self.weights,
            st.get("counter", empty), st.get("last_step", torch.empty(0, dtype=torch.int32)),
            st.get("adagrad_sum", empty), self.ub_stat, self.step, empty if loss is None else loss,
            self.counter_count, self.counter_thr, m.row_base, hf + [float(scale)], hi + [int(self.pooling == "mean")])

    def _update_triton(self, seg: Segments, grad: Tensor, loss: Optional[Tensor], scale: float
                       ) -> Tuple[Tensor, Tensor, Tensor]:
        m = self._meta_tensors()
        return _triton(required=True).update(seg, grad, m, max(self.dims), self.weights, self._state(), self.ub_stat,
                                             self.step, loss, scale, self.cfg, self.any_shadow,
                                             counter_tabs=(self.counter_count, self.counter_thr))

    def _update_torch(self, seg: Segments, grad: Tensor, loss: Optional[Tensor], scale: float
                      ) -> Tuple[Tensor, Tensor, Tensor]:
        """rules.apply_step over the sorted segments, table by table (n slots like Triton)."""
        n, dev, m = seg.n, grad.device, self._meta_tensors()
        keys = torch.full((n,), -1, dtype=torch.int64, device=dev)
        lam_all = torch.zeros(n, dtype=torch.float32, device=dev)
        upd_all = torch.zeros(n, dtype=torch.bool, device=dev)
        if n == 0:
            return keys, lam_all, upd_all
        first = torch.ones(n, dtype=torch.int64, device=dev)
        first[1:] = (seg.key[1:] != seg.key[:-1]).long()
        segid = torch.cumsum(first, 0) - 1               # unique row of each sorted lookup
        dmax = max(self.dims)
        cols = torch.arange(dmax, device=dev)
        dim_l = m.dim.index_select(0, seg.table.long())
        cmask = cols.unsqueeze(0) < dim_l.unsqueeze(1)
        # flat view over the rows of grad, which may be a column slice (row stride > width)
        flat = torch.as_strided(grad, ((grad.shape[0] - 1) * grad.stride(0) + grad.shape[1],), (1,)) if grad.numel() \
            else grad.reshape(-1)
        contrib = flat[torch.where(cmask, seg.gaddr.unsqueeze(1) + cols, 0)] * cmask * seg.weight.unsqueeze(1)
        main = (seg.shadow == 0).unsqueeze(1).to(contrib.dtype)
        g = contrib.new_zeros(n, dmax).index_add_(0, segid, contrib * main)
        h = contrib.new_zeros(n, dmax).index_add_(0, segid, contrib * (1 - main))
        n_main = contrib.new_zeros(n).index_add_(0, segid, main.squeeze(1))
        n_sh = contrib.new_zeros(n).index_add_(0, segid, 1 - main.squeeze(1))
        start = seg.seg_start[:n].clamp_max(n - 1)
        key_u, tab_u = seg.key.index_select(0, start).long(), seg.table.index_select(0, start).long()
        valid = torch.arange(n, device=dev) < seg.num_rows
        keys = torch.where(valid, key_u, keys)
        loss_v = None if loss is None else loss * scale
        table_names = self.cfg.table_state_names()
        for t, D in enumerate(self.dims):
            sel = valid & (tab_u == t)
            if self.cfg.lexico:
                sel &= n_main > 0          # transfer-only rows: nothing certified, not counted
            u = sel.nonzero().squeeze(1)
            if u.numel() == 0:
                continue
            rows = key_u[u]
            waddr = (self.w_off[t] + (rows - self.r_off[t]) * D).unsqueeze(1) + torch.arange(D, device=dev)
            state = {k: v.index_select(0, rows) for k, v in self._state().items()}
            table = {k: self.ub_stat[t, i] for i, k in enumerate(table_names)}
            res = rules.apply_step(self.cfg, self.weights[waddr], g[u, :D], state, self.step[0],
                                   h=h[u, :D] if self.any_shadow else None,
                                   has_h=(n_sh[u] > 0) if self.any_shadow else None, loss=loss_v,
                                   table_state=table or None, row_ids=rows - self.r_off[t] + self.row_base[t],
                                   counter_tabs=(self.counter_count, self.counter_thr))
            self.weights[waddr] = res.rows
            for k, v in res.state.items():
                getattr(self, k).index_copy_(0, rows, v)
            for i, k in enumerate(table_names):
                self.ub_stat[t, i] = res.table_state[k]
            upd_all[u] = True
            if res.lam is not None:
                lam_all[u] = res.lam.float()
        return keys, lam_all, upd_all


def _prefix(xs: List[int]) -> List[int]:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def _replace(cfg: RuleConfig, **kw: Any) -> RuleConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)
