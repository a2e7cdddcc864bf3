"""Top-1 accuracy on a held-out set, sharded across DDP ranks (the number every comparison here reports, in %)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


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
