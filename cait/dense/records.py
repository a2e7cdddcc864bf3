"""The lines of a segmentation run's ``log.jsonl``, typed like the fine-tune engine's (:mod:`cait.finetune.records`,
whose :func:`~cait.finetune.records.from_json` reads these once this module is imported). mIoU and IoUs in %,
FLOPs as multiply-adds for one image at the run's input size."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..finetune.records import register


@register
@dataclass
class SegmentStartRecord:
    """The first line of a new run: its configuration, the backbone it reads and what the segmenter costs."""

    TYPE: ClassVar[str] = "segment_start"
    config: dict
    backbone: str                  # what the backbone is (original, CAIT twin, a baseline of it, ...)
    classes: list[str]
    img_size: int
    backbone_flops: int
    segmenter_flops: int           # backbone + pyramid + decoder + head
    trainable_params: int
    world_size: int
    device: str


@register
@dataclass
class SegmentTrainRecord:
    """Every ``log_interval`` steps."""

    TYPE: ClassVar[str] = "segment_train"
    step: int
    loss: float
    lr: float
    images_per_s: float


@register
@dataclass
class SegmentEvalRecord:
    """Every ``eval_interval`` steps and at the end: held-out mIoU and per-class IoU."""

    TYPE: ClassVar[str] = "segment_eval"
    step: int
    miou: float
    per_class_iou: list[float] = field(default_factory=list)
    pixel_accuracy: float | None = None
