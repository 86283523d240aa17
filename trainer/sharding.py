"""Shard a model's EmbeddingBagCollection(s) with per-table optimizers (ours or FBGEMM's).

`shard_model` applies one fused optimizer per table (`_apply_optimizer_in_backward`), plans
with explicit `ParameterConstraints` per table (sharding type and compute kernel from the
config; a fused-optimizer table is never left to the planner's data_parallel/dense choice,
docs/ALGORITHMS.md §2 pitfall 5), and builds DistributedModelParallel inside our kernel hook.

Gradient division (decided): TorchRec's all-to-all backward divides embedding gradients by
the world size (`comm_ops.set_gradient_division`, default True). We keep that default: the
trainer's loss is a per-rank mean, DDP averages dense gradients, so with division the
embedding gradient is the gradient of the global mean loss, like the dense one, for FBGEMM
baselines and our kernel alike. `set_main_loss` averages the loss over ranks to match.

Topology (`build_topology`): through TorchRec's TopologyFactory with the node layout of the job
(torchrun's LOCAL_WORLD_SIZE: 2 nodes x 8 GPUs is planned as 2 hosts of 8, not one host of 16),
HBM per device from the device itself (CUDA total memory) and DDR per rank from the host's memory
over the local ranks, each overridable in the config (embedding.hbm_cap_gb / ddr_cap_gb).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from trainer.optim import fbgemm
from trainer.optim.names import DENSE_OPTIMIZERS, STEP_RULES
from trainer.optim.rules import rule_config_from
from trainer.optim.torchrec_adapter import (
    TailrecOptimizer,
    kernel_stats,
    load_ub_state,
    optimizer_kwargs,
    set_main_loss,
    set_optimizer_step,
    tailrec_kernels,
    ub_state,
)

__all__ = ["ShardResult", "shard_model", "build_topology", "set_optimizer_step", "set_main_loss", "kernel_stats",
           "ub_state", "load_ub_state"]
GIB = 1024 ** 3
log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    dmp: DistributedModelParallel
    plan: ShardingPlan
    plan_text: str
    dense_emb_params: List[Tuple[str, nn.Parameter]] = field(default_factory=list)  # dense_adam tables
    optimizers: Dict[str, str] = field(default_factory=dict)  # table -> optimizer name


class AllShardingsSharder(EmbeddingBagCollectionSharder):
    """The stock sharder offers row_wise (and friends) only for compute_device 'cuda';
    they run fine on CPU/gloo, and the plan's constraints pick the one the config asks for."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return super().sharding_types("cuda" if compute_device_type == "cpu" else compute_device_type)


def build_topology(world_size: int, device: torch.device, local_world_size: Optional[int] = None,
                   hbm_cap_bytes: Optional[int] = None, ddr_cap_bytes: Optional[int] = None) -> Topology:
    """The job's Topology via TopologyFactory. `local_world_size`: ranks per node (default: torchrun's
    LOCAL_WORLD_SIZE, else all ranks on one node). Capacities: the given ones (the config), else
    detected (HBM: the CUDA device's memory; DDR: host memory / local ranks), else TorchRec's."""
    lws = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if lws < 1 or world_size % lws:
        raise ValueError(f"world size {world_size} is not a whole number of nodes of {lws} local ranks")
    hbm = None
    if device.type == "cuda" and torch.cuda.is_available():
        hbm = torch.cuda.get_device_properties(device).total_memory
    ddr = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        ddr = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // lws
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, local_world_size=lws, hbm_cap_bytes=hbm_cap_bytes,
                                     ddr_cap_bytes=ddr_cap_bytes),
        hardware_config=HardwareConfig(hbm_cap_bytes=hbm, ddr_cap_bytes=ddr),
        kernel_config=KernelConfig(compute_device=device.type))


def table_optimizer_kwargs(opt_cfg: Any) -> Optional[Dict[str, Any]]:
    """kwargs for `_apply_optimizer_in_backward`, or None for a dense (torch Adam) table."""
    if opt_cfg.name in STEP_RULES:
        return optimizer_kwargs(rule_config_from(opt_cfg))
    if opt_cfg.name in DENSE_OPTIMIZERS:
        return None
    return fbgemm.fused_params(opt_cfg)


def _constraints(emb_cfg: Any, tables: List[EmbeddingBagConfig],
                 extra: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, ParameterConstraints]:
    out, extra = {}, extra or {}
    for t in tables:
        _, st, opt = emb_cfg.for_table(t.name)
        if opt.name in DENSE_OPTIMIZERS:
            out[t.name] = ParameterConstraints(sharding_types=["data_parallel"], compute_kernels=["dense"])
            continue
        if st == "data_parallel":
            raise ValueError(f"table {t.name}: data_parallel ignores fused optimizer {opt.name!r} "
                             "(use table_wise/row_wise/column_wise, or dense_adam)")
        if opt.name in STEP_RULES and opt.lexico and st == "column_wise":
            raise ValueError(f"table {t.name}: lexico needs full-row norms; column_wise splits rows")
        out[t.name] = ParameterConstraints(sharding_types=[st], compute_kernels=[emb_cfg.compute_kernel],
                                           **extra.get(t.name, {}))
    return out


def _ebcs(model: nn.Module) -> List[EmbeddingBagCollection]:
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    if not ebcs:
        raise ValueError("model has no EmbeddingBagCollection to shard")
    return ebcs


def _apply_table_optimizers(model: nn.Module, emb_cfg: Any, tables: List[EmbeddingBagConfig]) -> Dict[str, str]:
    names = {t.name for t in tables}
    chosen = {}
    for ebc in _ebcs(model):
        for name, bag in ebc.embedding_bags.items():
            if name not in names:
                continue
            opt = emb_cfg.for_table(name)[2]
            opt.validate(f"embedding.tables.{name}.optimizer")
            chosen[name] = opt.name
            kw = table_optimizer_kwargs(opt)
            if kw is not None:
                _apply_optimizer_in_backward(TailrecOptimizer, [bag.weight], kw)
    return chosen


def shard_model(model: nn.Module, emb_cfg: Any, tables: List[EmbeddingBagConfig],
                pg: Optional[dist.ProcessGroup], device: torch.device,
                extra_constraints: Optional[Dict[str, Dict[str, Any]]] = None) -> ShardResult:
    """Shard `model` (built on meta) over `pg`; `emb_cfg` is trainer.config.EmbeddingConfig.
    `extra_constraints`: optional per-table ParameterConstraints fields (e.g. min_partition)."""
    pg = pg or dist.group.WORLD
    chosen = _apply_table_optimizers(model, emb_cfg, tables)
    fused = {"optimizer": fbgemm._TYPES["exact_sgd"], "learning_rate": float(emb_cfg.optimizer.lr)}
    # TorchRec's own sharder on GPUs; on CPU the same one with every sharding type allowed
    sharder = (EmbeddingBagCollectionSharder if device.type == "cuda" else AllShardingsSharder)(fused_params=fused)
    topology = build_topology(dist.get_world_size(pg), device,
                              hbm_cap_bytes=int(getattr(emb_cfg, "hbm_cap_gb", 0) * GIB) or None,
                              ddr_cap_bytes=int(getattr(emb_cfg, "ddr_cap_gb", 0) * GIB) or None)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=_constraints(emb_cfg, tables, extra_constraints))
    plan = planner.collective_plan(model, [sharder], pg)
    with tailrec_kernels():
        dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=[sharder],
                                       env=ShardingEnv.from_process_group(pg))
    dense_names = {n for n, o in chosen.items() if o in DENSE_OPTIMIZERS}
    dense = [(n, p) for n, p in dmp.named_parameters()
             if any(n.endswith(f"embedding_bags.{t}.weight") for t in dense_names)]
    return ShardResult(dmp=dmp, plan=plan, plan_text=format_plan(plan, chosen), dense_emb_params=dense,
                       optimizers=chosen)


def format_plan(plan: ShardingPlan, optimizers: Dict[str, str]) -> str:
    """Readable table: table, sharding type, compute kernel, ranks, optimizer."""
    rows = [("table", "sharding", "kernel", "ranks", "optimizer")]
    for _, params in sorted(plan.plan.items()):
        for name, ps in sorted(params.items()):  # type: ignore[union-attr]
            ranks = ",".join(str(r) for r in sorted(set(ps.ranks or [])))
            rows.append((name, ps.sharding_type, ps.compute_kernel, ranks or "all", optimizers.get(name, "?")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
