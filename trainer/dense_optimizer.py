"""Dense-parameter optimizer (Adam by default) as a TorchRec KeyedOptimizer with gradient clipping.

Embedding tables on fused kernels are updated inside backward and are excluded here; tables the
config keeps dense ("dense_adam", the papers' baseline) are included with the embedding lr.
"""
from __future__ import annotations

import torch
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from trainer.config import DenseOptimConfig

_CLASSES = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}


def build_dense_optimizer(model: torch.nn.Module, cfg: DenseOptimConfig,
                          dense_emb_params: dict[str, float] | None = None) -> KeyedOptimizer:
    """``dense_emb_params``: parameter name -> lr, for embedding tables trained by this optimizer."""
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    emb_lr = dense_emb_params or {}
    cls = _CLASSES[cfg.name]

    def factory(plist):
        by_id = {id(p): n for n, p in params.items()}
        dense = [p for p in plist if by_id[id(p)] not in emb_lr]
        groups = [{"params": dense, "lr": cfg.lr, "weight_decay": cfg.weight_decay}] if dense else []
        # embedding rows are sparse: no weight decay on them (it would shrink every row every step)
        groups += [{"params": [p], "lr": emb_lr[by_id[id(p)]], "weight_decay": 0.0}
                   for p in plist if by_id[id(p)] in emb_lr]
        return cls(groups)

    opt = KeyedOptimizerWrapper(params, factory)
    if cfg.clip_grad_norm > 0:
        opt = GradientClippingOptimizer(opt, clipping=GradientClipping.NORM, max_gradient=cfg.clip_grad_norm)
    return opt
