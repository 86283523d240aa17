"""Process-group and device set-up: one rank alone, or N ranks under torchrun / TorchX.

gloo on CPU, NCCL on GPU, chosen from the device; nothing here hard-codes a device type.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.launch import free_port


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_s: int = 600) -> DistEnv:
    """Join (or create) the default process group. Without torchrun, a 1-rank group on a free port."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # single process started by hand
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(free_port())
        timeout = timedelta(seconds=timeout_s)
        store = _restart_safe_store(timeout)
        if store is not None:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return DistEnv(rank, world, local_rank, dev, backend)


def _restart_safe_store(timeout: timedelta):
    """A fresh key space in torchrun's shared TCPStore after an elastic restart (None: use env://).

    torchrun (c10d rendezvous) shares its agent's TCPStore with the workers and keeps it across
    ``--max-restarts`` restarts, but ``env://`` adds no per-attempt prefix (pytorch#135712): restarted
    ranks read the previous attempt's gloo/NCCL addresses and fail with "connectFullMesh ... Connection
    refused" until the restarts run out. On one node every worker gets the same
    TORCHELASTIC_RESTART_COUNT from the one agent, so it is a safe prefix. Across nodes the agents'
    counts can differ; there set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun instead.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt == 0:
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) != 1:
        import logging

        logging.getLogger("tailrec.dist").warning(
            "elastic restart %d with torchrun's shared store across nodes: stale rendezvous keys may "
            "break init; launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", attempt)
        return None
    tcp = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                        int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"tailrec/restart_{attempt}", tcp)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
