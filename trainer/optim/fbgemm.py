"""FBGEMM baselines: map `EmbOptimConfig` to TorchRec/FBGEMM fused params (docs/ALGORITHMS.md §2).

* exact_sgd / exact_adagrad / exact_rowwise_adagrad: FBGEMM's fused optimizers.
* counter_sgd: EXACT_ROWWISE_ADAGRAD + WeightDecayMode.COUNTER + a
  CounterBasedRegularizationDefinition with learning_rate_mode=COUNTER_SGD:
  eta = lr / (sqrt(adjustment_ub * c) + eps) after `adjustment_iter` (rowwise Adagrad before).
  FBGEMM does not checkpoint its `iter`: call sharding.set_optimizer_step after a restore.
  `lr_max` has no FBGEMM counterpart (rejected when finite).
* dense_adam: no fused params; the table is kept data_parallel with the dense kernel and the
  trainer's torch Adam trains it (sharding.ShardResult.dense_emb_params).
"""
from __future__ import annotations

import math
from typing import Any, Dict

from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    CounterBasedRegularizationDefinition,
    CounterWeightDecayMode,
    LearningRateMode,
    WeightDecayMode,
)

from trainer.optim.names import FBGEMM_OPTIMIZERS

_TYPES = {
    "exact_sgd": EmbOptimType.EXACT_SGD,
    "exact_adagrad": EmbOptimType.EXACT_ADAGRAD,
    "exact_rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "counter_sgd": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
}


def fused_params(cfg: Any) -> Dict[str, Any]:
    """Per-table kwargs for `_apply_optimizer_in_backward` (TorchRec renames lr ->
    learning_rate; "optimizer" given explicitly so the carrier class is never mapped)."""
    if cfg.name not in FBGEMM_OPTIMIZERS:
        raise ValueError(f"{cfg.name!r} is not an FBGEMM optimizer {FBGEMM_OPTIMIZERS}")
    params: Dict[str, Any] = {"lr": float(cfg.lr), "optimizer": _TYPES[cfg.name]}
    if cfg.name != "exact_sgd":
        params["eps"] = float(cfg.eps)
    if cfg.name == "counter_sgd":
        if math.isfinite(cfg.lr_max):
            raise ValueError("counter_sgd (FBGEMM) has no lr_max; use our 'cfsgd' for a capped step")
        params["weight_decay"] = float(cfg.weight_decay)
        params["weight_decay_mode"] = WeightDecayMode.COUNTER
        params["counter_based_regularization"] = CounterBasedRegularizationDefinition(
            counter_weight_decay_mode=CounterWeightDecayMode.NONE,
            counter_halflife=_halflife(cfg.counter_halflife),
            adjustment_iter=int(cfg.adjustment_iter),
            adjustment_ub=float(cfg.adjustment_ub),
            learning_rate_mode=LearningRateMode.COUNTER_SGD,
        )
    elif cfg.weight_decay:
        params["weight_decay"] = float(cfg.weight_decay)
        params["weight_decay_mode"] = WeightDecayMode.L2
    return params


def _halflife(h: float) -> int:
    # FBGEMM declares counter_halflife as an int; refuse silent truncation.
    if h != int(h):
        raise ValueError(f"counter_sgd needs an integer counter_halflife, got {h}")
    return int(h)


def state_bytes_per_row(cfg: Any, dim: int) -> int:
    """Optimizer-state bytes per embedding row (fp32 state, as FBGEMM allocates on CPU)."""
    return {
        "exact_sgd": 0,
        "exact_adagrad": 4 * dim,
        "exact_rowwise_adagrad": 4,
        "counter_sgd": 12,          # momentum1 + prev_iter + row_counter
        "dense_adam": 8 * dim,      # torch Adam exp_avg + exp_avg_sq
    }[cfg.name]
