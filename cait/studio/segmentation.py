"""The Segmentation tab's answers: the bundled segmenters (``assets/segmenters/``: the original, its CAIT twin, and ToMe
and token pruning at the twin's FLOPs, each a probe with the same decoder) and those finished segmentation jobs
made (:class:`JobSegmenters`) on a photo, a held-out synthetic sample (with its true mask) or an upload; their
per-class IoU on the 1000 held-out images as shipped; and their FLOPs, throughput and latency measured in one run
on this device."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from PIL import Image

from ..data.photos import model_view, preprocess
from ..data.synthetic import CLASSES, SyntheticShapes
from ..dense.checkpoint import CONFIG_NAME, load_segmenter, segmenter_flops
from ..dense.segmenter import Segmenter
from ..io.bundled import ASSETS_DIR
from ..io.checkpoint import CheckpointError
from ..measure.speed import throughput_and_latency
from .jobs.manager import JobManager
from .jobs.process import hide_paths
from .public import Limits
from .samples import Sample

SEGMENTERS_DIR = ASSETS_DIR / "segmenters"
LABELS = {"original": "original", "cait": "CAIT twin", "tome": "ToMe (merges undone)",
          "token_pruning": "token pruning (EViT, drops filled in)"}
"""The bundled segmenters, in the order shown."""
BASELINES = ("tome", "token_pruning")
"""Shown on request."""


def colour_map(classes: list[str]) -> dict[str, str]:
    """One fixed colour per class name (matplotlib's tab10), so every mask of the page uses the same legend."""
    tab = colormaps["tab10"]
    return {c: "#%02x%02x%02x" % tuple(int(255 * v) for v in tab(i % 10)[:3]) for i, c in enumerate(classes)}


class BundledSegmenters:
    """The segmenters in ``root`` (default ``assets/segmenters``), loaded once each on first use.

    Args:
        root: a folder of segmenter directories named as :data:`LABELS`.
        device: where they run.
    """

    def __init__(self, root: str | Path = SEGMENTERS_DIR, device: str | torch.device = "cpu") -> None:
        self.root, self.device = Path(root), torch.device(device)
        self._loaded: dict[str, Segmenter] = {}
        self._lock = threading.Lock()

    def available(self) -> list[str]:
        """Names with a ``segmenter.json``, in :data:`LABELS` order."""
        return [n for n in LABELS if (self.root / n / CONFIG_NAME).is_file()]

    def get(self, name: str) -> Segmenter:
        """The segmenter ``name``.

        Raises:
            ValueError: for a name not in :meth:`available`, or one that cannot be loaded (said why).
        """
        if name not in self.available():
            raise ValueError(f"Segmenter: {str(name)[:40]!r} is not bundled here (python assets/train_segmenters.py "
                             "trains it)")
        with self._lock:
            if name not in self._loaded:
                try:
                    self._loaded[name] = load_segmenter(self.root / name, self.device)
                except CheckpointError as e:
                    raise ValueError(f"the bundled {LABELS[name]} segmenter cannot be loaded ({e})") from None
            return self._loaded[name]

    def scores(self) -> pd.DataFrame:
        """Per-class IoU (%) of every available segmenter on its held-out images, as shipped (``segmenter.json``),
        one column per segmenter, the mIoU last."""
        columns, classes = {}, None
        for name in self.available():
            cfg = json.loads((self.root / name / CONFIG_NAME).read_text())
            score, classes = cfg.get("score") or {}, cfg["classes"]
            columns[LABELS[name]] = list(score.get("per_class_iou", [None] * len(classes))) + [score.get("miou")]
        if not columns:
            return pd.DataFrame()
        return pd.DataFrame({"class": list(classes) + ["mIoU"], **columns})


class JobSegmenters:
    """The segmenters finished segmentation jobs made, by job id, loaded on first use (the newest 4 kept).

    Args:
        jobs: the job manager (None: no jobs, none available).
        device: where they run.
    """

    def __init__(self, jobs: JobManager | None, device: str | torch.device = "cpu", keep: int = 4) -> None:
        self.jobs, self.device, self.keep = jobs, torch.device(device), keep
        self._loaded: dict[str, Segmenter] = {}
        self._lock = threading.Lock()

    def available(self, viewer: str | None = None) -> list[tuple[str, str]]:
        """``(label, job id)`` of finished segmentation jobs ``viewer`` may use, newest first: locally all; in public
        mode none trained on another visitor's upload."""
        out = []
        for j in self.jobs.finished("segment") if self.jobs is not None else []:
            if not self.jobs.visible(j, viewer):
                continue
            out.append((f"job {j.id}: {j.model_label()} ({j.message.removeprefix('done: ')})", j.id))
        return out

    def get(self, job_id: str, viewer: str | None = None) -> Segmenter:
        """The segmenter of job ``job_id``.

        Raises:
            ValueError: for an unknown id, a job that is not a finished segmentation this viewer may use, or a
                segmenter that cannot be loaded (said why, no path).
        """
        if job_id not in {i for _, i in self.available(viewer)}:
            raise ValueError(f"Segmenter job: {str(job_id)[:40]!r} is not a finished segmentation job of yours")
        with self._lock:
            if job_id not in self._loaded:
                try:
                    seg = load_segmenter(self.jobs.get(job_id).product(self.jobs.root).parent, self.device)
                except (CheckpointError, KeyError) as e:
                    why = hide_paths(str(e))[:200]
                    raise ValueError(f"job {job_id}'s segmenter cannot be loaded ({why})") from None
                while len(self._loaded) >= self.keep:
                    self._loaded.pop(next(iter(self._loaded)))
                self._loaded[job_id] = seg
            return self._loaded[job_id]


@dataclass
class SegmentationView:
    """What the tab shows for one image: the input as the models see it, each segmenter's annotated masks
    (``(image, [(mask (H, W) 0/1, class)])``, Gradio's AnnotatedImage value), and the true mask when known."""

    image: Image.Image
    masks: dict[str, tuple]
    truth: tuple | None
    colours: dict[str, str]


def _annotated(image: Image.Image, pred: np.ndarray, classes: list[str]) -> tuple:
    """``(image, [(mask, class), ...])`` for every class present except the background (index 0)."""
    return image, [((pred == k).astype(np.float32), classes[k]) for k in np.unique(pred) if k != 0]


@torch.no_grad()
def segmentation_view(segs: BundledSegmenters | dict[str, Segmenter], names: list[str], sample: Sample
                      ) -> SegmentationView:
    """Each listed segmenter's prediction on ``sample``, all at the first one's input size and with its classes; a
    synthetic sample (rendered at that size) also shows its true mask when those are the synthetic classes.

    Args:
        segs: where the names are looked up: the bundled segmenters, or ``{name: segmenter}`` (a job's).

    Raises:
        ValueError: for a segmenter that is not bundled.
    """
    first = segs.get(names[0])
    size = int(first.backbone.patch_embed.img_size[0])
    if sample.mask is not None:
        x, view = SyntheticShapes.normalise_image(sample.image)[None], sample.image
    else:
        x, view = preprocess(first.backbone, [sample.image]), model_view(first.backbone, sample.image)
    classes = first.classes
    masks = {}
    for name in names:
        seg = segs.get(name)
        device = next(seg.parameters()).device
        pred = seg(x.to(device)).argmax(dim=1)[0].cpu().numpy()                       # (S, S) class indices
        masks[name] = _annotated(view, pred, classes)
    truth = None
    if sample.mask is not None and sample.label in CLASSES and classes[1:] == list(CLASSES):
        target = sample.mask.numpy().astype(np.int64) * (CLASSES.index(sample.label) + 1)
        truth = _annotated(view, target[:size, :size], classes)
    return SegmentationView(view, masks, truth, colour_map(classes))


def segmenter_cost(segs: BundledSegmenters, names: list[str], limits: Limits, batch_size: int = 8,
                   progress=None) -> pd.DataFrame:
    """Backbone and segmenter FLOPs (multiply-adds, one image) of each listed segmenter, images/s at ``batch_size``
    and latency at batch 1, measured in alternation in one run on this device: each timed figure is the median over
    the rounds with the lowest and highest round in brackets, speed-ups against the first segmenter taken round by
    round (:func:`cait.measure.speed.speedup_spread`); *rounds* says how many fitted the time budget.

    Raises:
        ValueError: for a batch size outside what these limits allow (the message names the field).
    """
    cap = limits.cost_batch_cap()
    if not 1 <= int(batch_size) <= cap:
        raise ValueError(f"Batch size: {batch_size} is outside 1 to {cap}"
                         + (" on this public Space" if limits.public else ""))
    models = {LABELS[n]: segs.get(n) for n in names}
    size = int(next(iter(models.values())).backbone.patch_embed.img_size[0])
    speed = throughput_and_latency(models, int(batch_size), segs.device, iters=1 if limits.public else 2,
                                   rounds=5, img_size=size, progress=progress, budget_s=limits.measure_budget())
    rows = []
    for label, seg in models.items():                                  # each figure: median (min–max) over rounds
        backbone, total = segmenter_flops(seg, size)
        sp = speed[label]
        rows.append({"segmenter": label, "backbone GFLOPs": round(backbone / 1e9, 3),
                     "segmenter GFLOPs": round(total / 1e9, 3), "images/s": sp["images_per_s_spread"].format(1),
                     "speed-up": str(sp["speedup"]), "latency, batch 1 (ms)": sp["latency_ms_spread"].format(1),
                     "latency speed-up": str(sp["latency_speedup"]), "rounds": sp["rounds"]})
    return pd.DataFrame(rows)
