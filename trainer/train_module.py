"""The module DistributedModelParallel wraps: model + loss, ``forward(batch) -> (loss, outputs)``.

This is the shape TorchRec's TrainPipelineSparseDist expects (like torchrec's DLRMTrain). It must
stay symbolically traceable: the pipeline traces it to find the sharded EBC's input.
"""
from __future__ import annotations

import torch
from torch import nn


class TrainModule(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch):
        logits = self.model(batch.dense_features, batch.sparse_features)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)
