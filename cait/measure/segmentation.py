"""Segmentation quality: mean and per-class IoU (torchmetrics' ``MulticlassJaccardIndex``) and pixel accuracy over
a held-out set, in percent — the paper's dense-transfer metric (single-scale mIoU, §IV-B1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex


@dataclass(frozen=True)
class SegmentationScore:
    """``miou``: the mean of ``per_class_iou`` over the classes (each in %, intersection over union of predicted and
    true pixels over the whole set); ``pixel_accuracy``: share of pixels labelled right (%); ``images``: how many."""

    miou: float
    per_class_iou: list[float]
    pixel_accuracy: float
    images: int


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset, num_classes: int, device: str | torch.device = "cpu",
                          batch_size: int = 16) -> SegmentationScore:
    """Score a segmenter (``model(x) → (B, K, S, S)`` logits) on ``dataset`` items ``(x (3, S, S), target (S, S))``.

    Raises:
        ValueError: for an empty dataset, or targets holding a class index ``>= num_classes``.
    """
    if len(dataset) == 0:
        raise ValueError("no images to evaluate on")
    device = torch.device(device)
    # One process scores the whole held-out split (rank 0 of a torchrun), so the metrics never wait for the others.
    iou = MulticlassJaccardIndex(num_classes, average="none", sync_on_compute=False).to(device)
    acc = MulticlassAccuracy(num_classes, average="micro", sync_on_compute=False).to(device)
    model.eval()
    for i in range(0, len(dataset), batch_size):
        xs, ys = zip(*(dataset[j] for j in range(i, min(len(dataset), i + batch_size))))
        y = torch.stack(ys).to(device)
        if int(y.max()) >= num_classes or int(y.min()) < 0:
            raise ValueError(f"targets hold class {int(y.max())}, outside 0..{num_classes - 1}")
        pred = model(torch.stack(xs).to(device)).argmax(dim=1)
        iou.update(pred, y)
        acc.update(pred, y)
    per_class = [round(100 * float(v), 2) for v in iou.compute()]
    return SegmentationScore(round(sum(per_class) / num_classes, 2), per_class, round(100 * float(acc.compute()), 2),
                             len(dataset))
