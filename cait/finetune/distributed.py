"""Processes and seeds shared by the training engines (fine-tuning, segmentation): one process or ``torchrun``'s,
and every RNG seeded from (seed, step) so a resumed run repeats the uninterrupted one."""
from __future__ import annotations

import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from .config import FinetuneError


def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)`` of this process: one process, or ``torchrun``'s (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``), with the process group started (NCCL on GPU, Gloo on CPU).

    Raises:
        FinetuneError: if CUDA is asked for but torch sees no GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if cuda and not torch.cuda.is_available():
        raise FinetuneError("CUDA was asked for, but torch sees no GPU here; use --device cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def broadcast(obj, rank: int, world: int):
    """Rank 0's ``obj`` on every rank (itself when there is one process)."""
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def out_of_time(t0: float, limit_s: float | None, world: int, device: torch.device | None = None) -> bool:
    """Whether ``limit_s`` seconds have passed since ``t0`` (``time.perf_counter()``); with several processes, as soon
    as any of them says so, so that all stop at the same step."""
    if limit_s is None:
        return False
    late = time.perf_counter() - t0 > limit_s
    if world > 1:
        flag = torch.tensor([float(late)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        late = bool(flag.item())
    return late


def seed_step(seed: int, step: int) -> None:
    """Seed every RNG from (seed, step): augmentation is then the same whether or not the run was resumed."""
    s = (seed * 1_000_003 + step) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
