"""The module DistributedModelParallel wraps: model + loss, ``forward(batch) -> (loss, outputs)``.

This is the shape TorchRec's TrainPipelineSparseDist expects (like torchrec's DLRMTrain). It must
stay symbolically traceable: the pipeline FX-traces it to find the sharded EBC's input. The traced
forward therefore has no Python control flow on tensors: the transfer term lives in
``TransferTerm``, a leaf module (it holds no sharded submodule, so the pipeline's tracer calls it
as one node and never traces into it).

Transfer (trainer/transfer_wiring.py): ``loss = main + coef * sum_f l_tr(f)`` where l_tr is computed
on the shadow feature's pooled rows (one row per unique target id of the batch). ``coef`` is
``transfer.weight`` for plus_t/select and 1 for lexico/both, where our kernel combines h and g per
row (it needs the global main loss first: ``set_main_loss``, a collective, called on every rank).
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.transfer_wiring import shadow_name


def _first_rows(jt_values: torch.Tensor, jt_lengths: torch.Tensor):
    """Unique ids of a single-valued jagged feature and, per unique id, the index of the first
    example holding it."""
    b = jt_lengths.numel()
    ex = torch.repeat_interleave(torch.arange(b, device=jt_values.device), jt_lengths.long())
    uniq, inv = torch.unique(jt_values, return_inverse=True)
    first = torch.full((uniq.numel(),), b, dtype=torch.long, device=jt_values.device)
    first.scatter_reduce_(0, inv, ex, reduce="amin")
    return uniq, first


def _anchor_pairs(nb, s_ids, s_first, t_first, pooled, f, d):
    """(anchor rows, target rows) for the target ids whose neighbor ``nb`` (-1: none) is among the batch's
    unique ids of ``f`` (``s_ids``, sorted): the anchor is that id's pooled row, detached."""
    if s_ids.numel() == 0:
        ok = torch.zeros_like(nb, dtype=torch.bool)
        pos = torch.zeros_like(nb)
    else:
        pos = torch.searchsorted(s_ids, nb.clamp_min(0)).clamp_max(s_ids.numel() - 1)
        ok = (nb >= 0) & (s_ids[pos] == nb)
    return pooled[f][s_first[pos[ok]], :d].detach(), pooled[shadow_name(f)][t_first[ok], :d], ok


class TransferTerm(nn.Module):
    """Leaf module: ``forward(main, kt, kjt) -> main + coef * transfer`` (train mode; else ``main``).

    The runtime (domains, loss modules with FRAGE's discriminator and its optimizer) is held
    unregistered, so neither the model's parameters, DDP nor the dense optimizer see it.
    """

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "runtime", None)

    def set_runtime(self, runtime) -> None:
        object.__setattr__(self, "runtime", runtime)

    def forward(self, main: torch.Tensor, kt, kjt) -> torch.Tensor:
        rt = self.runtime
        if rt is None or not self.training:
            return main
        if rt.lexico:
            from trainer.sharding import set_main_loss

            set_main_loss(rt.dmp, main)
        from trainer.optim.transfer_loss import split_rows

        total = None
        pooled = kt.to_dict()
        for f, dom in rt.domains.items():
            d = dom.factor_dim
            sh = kjt[shadow_name(f)]
            t_ids, t_first = _first_rows(sh.values(), sh.lengths())
            mj = kjt[f]
            s_ids, s_first = _first_rows(mj.values(), mj.lengths())
            loss_mod = rt.losses[f]
            if getattr(loss_mod, "paired", False):   # each target row with its neighbor's row, when that id is in the batch
                src, tgt, ok = _anchor_pairs(dom.neighbor_of[t_ids], s_ids, s_first, t_first, pooled, f, d)
                loss_mod.set_coverage(torch.tensor(src.shape[0] / max(1, t_ids.numel())))
                tr = loss_mod(src, tgt, None if dom.anchor_weight is None else dom.anchor_weight[t_ids[ok]])
            else:
                s_mask, _ = split_rows(s_ids, dom.is_source, None, check=False)
                src = pooled[f][s_first[s_mask], :d].detach()
                tgt = pooled[shadow_name(f)][t_first, :d]
                tr = loss_mod(src, tgt)
            total = tr if total is None else total + tr
        return main if total is None else main + rt.coef * total


class HeadCall(nn.Module):
    """Leaf wrapper for ``model.head`` (the model is held unregistered; its parameters stay
    registered under ``TrainModule.model``). Without it the pipeline's tracer traces the head's code,
    and into the elements of ModuleLists (its leaf list only names direct children), which fails on
    AutoInt's attention layers."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)

    def forward(self, dense: torch.Tensor, kt) -> torch.Tensor:
        return self.model.head(dense, kt)


class TrainModule(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.transfer = TransferTerm()
        self.head = HeadCall(model)

    def forward(self, batch):
        kjt = batch.sparse_features
        kt = self.model.embed(kjt)
        logits = self.head(batch.dense_features, kt)
        main = self.loss_fn(logits, batch.labels)
        loss = self.transfer(main, kt, kjt)
        return loss, (main.detach(), logits.detach(), batch.labels)
