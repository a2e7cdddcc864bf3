"""Held-out scores, sharded across DDP ranks: top-1 (%) against labels, and, without labels, a student's agreement
(%) with its teacher and the KL divergence between them (nats per image)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device: torch.device, batch_size: int = 64, rank: int = 0, world: int = 1
             ) -> float:
    """Top-1 (%) on a dataset, sharded across ranks and summed."""
    model.eval()
    correct = total = 0
    idx = list(range(rank, len(dataset), world))
    for i in range(0, len(idx), batch_size):
        xs, ys = zip(*(dataset[j] for j in idx[i:i + batch_size]))
        out = model(torch.stack(xs).to(device))
        correct += int((out.argmax(-1).cpu() == torch.tensor(ys)).sum())
        total += len(ys)
    if world > 1:
        t = torch.tensor([correct, total], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        correct, total = int(t[0]), int(t[1])
    return 100.0 * correct / max(total, 1)


@dataclass(frozen=True)
class Agreement:
    """A student against its teacher on unlabelled images: ``agreement`` (%) of images whose top-1 class is the
    teacher's, ``kl`` the mean KL(teacher ‖ student) of their softmax outputs in nats, over ``images``."""

    agreement: float
    kl: float
    images: int


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, dataset, device: torch.device, batch_size: int = 64,
              rank: int = 0, world: int = 1) -> Agreement:
    """How closely ``student`` follows ``teacher`` on ``dataset`` (items ``(image (3, S, S), anything)``; the
    labels are never read), sharded across ranks. Identical models give 100% and 0 nats."""
    student.eval(), teacher.eval()
    stats = torch.zeros(3, dtype=torch.float64)               # agreeing images, KL sum, images
    idx = list(range(rank, len(dataset), world))
    for i in range(0, len(idx), batch_size):
        x = torch.stack([dataset[j][0] for j in idx[i:i + batch_size]]).to(device)
        s, t = student(x).float().log_softmax(-1), teacher(x).float().log_softmax(-1)
        stats += torch.tensor([float((s.argmax(-1) == t.argmax(-1)).sum()),
                               float(F.kl_div(s, t, log_target=True, reduction="sum")), len(x)], dtype=torch.float64)
    if world > 1:
        stats = stats.to(device if device.type == "cuda" else "cpu")
        dist.all_reduce(stats)
        stats = stats.cpu()
    n = max(int(stats[2]), 1)
    return Agreement(100.0 * float(stats[0]) / n, float(stats[1]) / n, int(stats[2]))
