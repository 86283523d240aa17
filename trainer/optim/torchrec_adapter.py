"""The one place where tailrec adapts TorchRec 1.8 (see docs/ARCHITECTURE.md, "The fused optimizer").

* `TailrecEmbeddingBag`: a `BaseBatchedEmbeddingBag + FusedOptimizerModule` whose
  `emb_module` is our `kernel.TailrecTBE`. TorchRec's own `EmbeddingFusedOptimizer` wraps it,
  so weights and per-row state become ShardedTensors in `dmp.state_dict()` /
  `dmp.fused_optimizer.state_dict()` (DCP saves and reshards them). State keys:
  `<table>.momentum1` is the first entry of `RuleConfig.state_names()` (the CF-SGD counter,
  or the Adagrad sum for rowwise_adagrad: TorchRec names the first state so), the others
  keep their names (`<table>.last_step`, `<table>.adagrad_sum`, `<table>.step`).
* `tailrec_kernels()`: context manager that wraps
  `GroupedPooledEmbeddingsLookup._create_embedding_kernel` while DMP is built; table groups
  whose fused_params carry `MARKER_KEY` get our kernel, all others TorchRec's. The plan keeps
  compute kernel "fused", so the planner works unchanged. Guarded by
  tests/optim/test_torchrec_adapter.py (version + signature).
* Per-table route: `optimizer_kwargs(rule)` for `_apply_optimizer_in_backward(TailrecOptimizer,
  ...)`. "optimizer" is set to EXACT_SGD so TorchRec never maps our class to an FBGEMM type.
* Runtime API for the trainer: `set_main_loss`, `set_optimizer_step`, `kernel_stats`.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from torch import nn
from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag, EmbeddingFusedOptimizer
from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice
from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, GroupedEmbeddingConfig
from torchrec.distributed.types import ShardingType
from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizer, FusedOptimizerModule

from trainer.optim.kernel import MainLoss, TailrecTBE
from trainer.optim.rules import RuleConfig

MARKER_KEY = "tailrec_rule"
TORCHREC_VERSION = "1.8.0"
HOOKED_SIGNATURE = "(self, config, device, pg, sharding_type, env)"


class TailrecOptimizer(torch.optim.Optimizer):
    """Carrier class for `_apply_optimizer_in_backward` only: the sharded kernel does the work.
    On an unsharded module it does nothing."""

    def __init__(self, params: Any, lr: float = 0.01, **_: Any) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure: Any = None) -> None:  # pragma: no cover - never used sharded
        return None


def optimizer_kwargs(rule: RuleConfig) -> Dict[str, Any]:
    """Fused params for one table (the marker value is hashable: TorchRec hashes them)."""
    return {"lr": rule.lr, "optimizer": EmbOptimType.EXACT_SGD, MARKER_KEY: rule}


class TailrecEmbeddingBag(BaseBatchedEmbeddingBag[torch.Tensor], FusedOptimizerModule):
    def __init__(self, config: GroupedEmbeddingConfig, pg: Optional[dist.ProcessGroup] = None,
                 device: Optional[torch.device] = None, sharding_type: Optional[ShardingType] = None) -> None:
        super().__init__(config, pg, device, sharding_type)
        rule: RuleConfig = dict(config.fused_params or {})[MARKER_KEY]
        shadow = [f.endswith(rule.shadow_suffix) for t in config.embedding_tables for f in t.feature_names]
        if len(shadow) != len(self._feature_table_map):
            raise RuntimeError("feature names do not line up with TorchRec's feature_table_map")
        if rule.lexico and sharding_type == ShardingType.COLUMN_WISE:
            raise ValueError("lexico needs full-row norms; column_wise splits rows (use table_wise/row_wise)")
        pooling = {PoolingMode.SUM: "sum", PoolingMode.MEAN: "mean"}.get(self._pooling)
        if pooling is None:
            raise ValueError(f"pooling {self._pooling} not supported by the tailrec kernel")
        real = device if device is not None and device.type != "meta" else None
        self._emb_module = TailrecTBE(self._local_rows, self._local_cols, self._feature_table_map,
                                      shadow, rule, pooling=pooling, device=real,
                                      row_base=[_shard_offsets(t)[0] for t in config.embedding_tables])
        self._optim = EmbeddingFusedOptimizer(config, self._emb_module, pg)
        self.init_parameters()
        self._param_per_table = dict(self._gen_params_by_table())

    def _gen_params_by_table(self) -> Iterator[Tuple[str, TableBatchedEmbeddingSlice]]:
        counts, m = dict(self.table_name_to_count), self._emb_module
        for t, tbl in enumerate(self._config.embedding_tables):
            if tbl.name not in counts:
                continue
            cnt = counts.pop(tbl.name)
            start = m.w_off[t]
            w = TableBatchedEmbeddingSlice(data=m.weights, start_offset=start,
                                           end_offset=start + cnt * m.rows[t] * m.dims[t],
                                           num_embeddings=-1, embedding_dim=m.dims[t])
            w._in_backward_optimizers = [EmptyFusedOptimizer()]
            yield tbl.name, w

    @property
    def emb_module(self) -> TailrecTBE:  # type: ignore[override]
        return self._emb_module

    @property
    def fused_optimizer(self) -> FusedOptimizer:
        return self._optim

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        # State is exported through the fused optimizer, as for FBGEMM kernels.
        yield from ()

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, tensor in self.named_split_embedding_weights(prefix, recurse, remove_duplicate):
            p = nn.Parameter(tensor)
            p._in_backward_optimizers = [EmptyFusedOptimizer()]
            yield name, p


# ------------------------------------------------------------------------------ the hook
_ORIG_CREATE = GroupedPooledEmbeddingsLookup._create_embedding_kernel


def _create_embedding_kernel(self: Any, config: GroupedEmbeddingConfig, device: Any, pg: Any,
                             sharding_type: Any, env: Any) -> Any:
    if config.fused_params and MARKER_KEY in config.fused_params:
        if config.compute_kernel != EmbeddingComputeKernel.FUSED:
            raise ValueError(f"tailrec tables need compute kernel 'fused', got {config.compute_kernel}")
        return TailrecEmbeddingBag(config=config, pg=pg, device=device, sharding_type=sharding_type)
    return _ORIG_CREATE(self, config, device, pg, sharding_type, env)


def check_torchrec_compat() -> None:
    """Raise if the TorchRec version or the hooked method changed (the hook would be unsafe)."""
    import torchrec

    ver = getattr(torchrec, "__version__", "?")
    sig = str(inspect.signature(_ORIG_CREATE)).replace("Optional[", "").replace(" ", "")
    names = str(tuple(inspect.signature(_ORIG_CREATE).parameters)).replace("'", "").replace(" ", "")
    if not ver.startswith(TORCHREC_VERSION) or names != HOOKED_SIGNATURE.replace(" ", ""):
        raise RuntimeError(f"tailrec kernel hook written for torchrec {TORCHREC_VERSION} "
                           f"_create_embedding_kernel{HOOKED_SIGNATURE}; found {ver} {sig}")


@contextlib.contextmanager
def tailrec_kernels() -> Iterator[None]:
    """Kernels are created only in DMP / sharded-module construction, so the patch is scoped."""
    check_torchrec_compat()
    GroupedPooledEmbeddingsLookup._create_embedding_kernel = _create_embedding_kernel
    try:
        yield
    finally:
        GroupedPooledEmbeddingsLookup._create_embedding_kernel = _ORIG_CREATE


# ------------------------------------------------------------------------------ runtime API
def iter_kernels(module: nn.Module) -> Iterator[BaseBatchedEmbeddingBag]:
    """All embedding kernels of a DMP (module.modules() does not reach them)."""
    for m in module.modules():
        for lk in getattr(m, "_lookups", []) or []:
            lk = getattr(lk, "module", lk)  # data-parallel lookups are wrapped in DDP
            yield from getattr(lk, "_emb_modules", [])


def tailrec_kernels_of(dmp: nn.Module) -> List[TailrecEmbeddingBag]:
    cached = getattr(dmp, "_tailrec_kernels", None)
    if cached is None:
        cached = [k for k in iter_kernels(dmp) if isinstance(k, TailrecEmbeddingBag)]
        object.__setattr__(dmp, "_tailrec_kernels", cached)
    return cached


def set_main_loss(dmp: nn.Module, loss: torch.Tensor | float, pg: Optional[dist.ProcessGroup] = None,
                  reduce: bool = True) -> MainLoss:
    """Hand the scalar main loss (for the barrier phi) to our kernels before backward.

    The trainer's loss is a per-rank mean; with `reduce` it is averaged over ranks (one
    asynchronous scalar all-reduce, collective: call it on every rank, in the same order
    relative to other collectives) so every owner uses the global mean loss, matching the
    gradients (which are those of the global mean, see sharding.py). The loss stays a device
    tensor: the all-reduce is issued right after the forward and overlaps the dense backward; the
    kernel waits for it inside the stream and divides by the world size itself (kernel.MainLoss),
    so the host never reads it.
    """
    kernels = tailrec_kernels_of(dmp)
    if torch.is_tensor(loss):
        val = loss.detach().float().reshape(1).clone()
    else:  # a plain number (tests, tools): put it where the kernels read it
        dev = kernels[0].emb_module.weights.device if kernels else None
        val = torch.tensor([float(loss)], dtype=torch.float32, device=dev)
    out = MainLoss(val)
    if reduce and dist.is_initialized() and dist.get_world_size(pg) > 1:
        world = dist.get_world_size(pg)
        out = MainLoss(val, dist.all_reduce(val, group=pg, async_op=True), 1.0 / world)
    for k in kernels:
        k.emb_module.main_loss = out
    return out


def set_optimizer_step(dmp: nn.Module, step: int) -> None:
    """After a restore: our kernels restore `step` from the checkpoint, FBGEMM's do not
    (pitfall 3), so set every fused kernel to the global step (= completed steps)."""
    dmp.fused_optimizer.set_optimizer_step(int(step))  # type: ignore[operator, union-attr]
    for k in tailrec_kernels_of(dmp):
        k.emb_module.set_optimizer_step(int(step))


def kernel_stats(dmp: nn.Module, quantiles: Tuple[float, ...] = (0.5, 0.9, 0.99)) -> Dict[str, Dict[str, float]]:
    """Per local table shard: CF-SGD counter quantiles over rows updated in the last step and
    lexico lambda statistics (fraction > 0 and quantiles) of that step. Local to this rank."""
    out: Dict[str, Dict[str, float]] = {}
    for k in tailrec_kernels_of(dmp):
        tbe = k.emb_module
        st = tbe.last_stats
        if not st or st["rows"].numel() == 0:
            continue
        rows, upd = st["rows"][st["updated"]], st["updated"]
        tab = torch.bucketize(rows, torch.tensor(tbe.r_off[1:], device=rows.device), right=True)
        for t, tc in enumerate(k.config.embedding_tables):
            sel = tab == t
            if not bool(sel.any()):
                continue
            d = out.setdefault(tc.name, {"rows_updated": 0.0})
            d["rows_updated"] += float(sel.sum())
            if hasattr(tbe, "counter"):
                _quant(d, "counter", tbe.counter_estimate(rows[sel]), None, quantiles)
            if st["lambda"] is not None:
                lam = st["lambda"][upd][sel]
                d["lambda_active_ratio"] = float((lam > 0).float().mean())
                _quant(d, "lambda", lam, None, quantiles)
    return out


def _quant(d: Dict[str, float], name: str, src: Optional[torch.Tensor], idx: Optional[torch.Tensor],
           qs: Tuple[float, ...]) -> None:
    if src is None:
        return
    v = (src if idx is None else src.index_select(0, idx)).float()
    if v.numel() == 0:
        return
    for q, val in zip(qs, torch.quantile(v, torch.tensor(qs, device=v.device)).tolist()):
        d[f"{name}_p{int(round(q * 100))}"] = val


# ------------------------------------------------------------------------------ per-table ub state
def _shard_offsets(tc: Any) -> List[int]:
    """[first row, first column] of this rank's shard of the table ([0, 0] when not sharded)."""
    md = getattr(tc, "local_metadata", None)
    return [int(v) for v in md.shard_offsets] if md is not None else [0, 0]


def _shard_key(tc: Any) -> str:
    off = _shard_offsets(tc)
    return f"{tc.name}@{off[0]},{off[1]}"


def ub_state(dmp: nn.Module) -> Dict[str, List[float]]:
    """The ub_mode="table" estimates of every rank: ``{"<table>@<row>,<col>": [sum, count]}``, one entry per
    table shard (a shard keeps its own estimate over the rows and columns it holds). Collective when the
    process group has more than one rank (a few floats per shard are gathered)."""
    out: Dict[str, List[float]] = {}
    for k in tailrec_kernels_of(dmp):
        tbe = k.emb_module
        if tbe.ub_stat.numel():
            for t, tc in enumerate(k.config.embedding_tables):
                out[_shard_key(tc)] = [float(v) for v in tbe.ub_stat[t].tolist()]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, out)
        out = {key: v for part in parts for key, v in part.items()}
    return out


def load_ub_state(dmp: nn.Module, saved: Dict[str, List[float]]) -> int:
    """Restore ``ub_state`` entries: a shard found under its key takes its own values (the same sharding:
    exact); another sharding (other world size or plan) takes the mean of its table's saved shards.
    Returns how many shards had no exact match."""
    by_table: Dict[str, List[List[float]]] = {}
    for key, v in saved.items():
        by_table.setdefault(key.split("@")[0], []).append(v)
    approx = 0
    for k in tailrec_kernels_of(dmp):
        tbe = k.emb_module
        if not tbe.ub_stat.numel():
            continue
        for t, tc in enumerate(k.config.embedding_tables):
            key = _shard_key(tc)
            if key in saved:
                vals = saved[key]
            elif tc.name in by_table:
                approx += 1
                parts = by_table[tc.name]
                vals = [sum(p[i] for p in parts) / len(parts) for i in range(2)]
            else:
                continue
            tbe.ub_stat[t] = torch.tensor(vals, dtype=tbe.ub_stat.dtype, device=tbe.ub_stat.device)
    return approx
