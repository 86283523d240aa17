"""Step drivers with one interface, ``progress(iterator) -> (loss, logits, labels)``.

``SparseDistPipeline`` is TorchRec's TrainPipelineSparseDist (overlaps batch copy, the sparse
input all-to-all and compute); ``PlainStep`` is the unpipelined reference (forward, backward, step)
used when ``train.pipeline=false`` and in tests that compare both.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist


class TimedIterator:
    """Wraps the loader iterator to measure data-wait time (seconds blocked in ``next``)."""

    def __init__(self, it: Iterator):
        self.it, self.wait_s = it, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.wait_s += time.perf_counter() - t0


class PinnedBatches:
    """On CUDA, page-locks each batch so its host-to-device copy can be asynchronous (non_blocking
    below, and TorchRec's pipeline copies on its own stream); elsewhere batches pass through."""

    def __init__(self, it: Iterator, device: torch.device):
        self.it, self.pin = it, device.type == "cuda"

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        return batch.pin_memory() if self.pin else batch


class PlainStep:
    def __init__(self, model: torch.nn.Module, optimizer, device: torch.device):
        self.model, self.optimizer, self.device = model, optimizer, device

    def progress(self, it: Iterator):
        batch = next(it).to(self.device, non_blocking=True)
        self.optimizer.zero_grad()
        loss, out = self.model(batch)
        loss.backward()
        self.optimizer.step()
        return out

    def detach(self) -> None:
        pass


class SparseDistPipeline:
    def __init__(self, model: torch.nn.Module, optimizer, device: torch.device):
        self.pipe = TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)

    def progress(self, it: Iterator):
        return self.pipe.progress(it)

    def detach(self) -> None:
        # restores the sharded modules' original forwards (needed for plain eval forwards)
        self.pipe.detach()


def make_driver(pipelined: bool, model, optimizer, device):
    return (SparseDistPipeline if pipelined else PlainStep)(model, optimizer, device)
