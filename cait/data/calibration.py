"""Unlabelled calibration images for training-free compression (:func:`cait.compress.compress` with ``calibration=``).

One entry point, :func:`calibration_images`, and one small reader per kind of source: a named source (bundled photos
with random crops and flips, synthetic shapes, or half of each), a directory of image files, a tensor, or a
DataLoader. Every reader returns ``(n, 3, S, S)`` float images normalised the way the model expects.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import create_transform, resolve_data_config

from .datasets import DataError
from .hub import is_hub, load_splits
from .photos import SAMPLE_PHOTOS, ImageError, list_images, load_image, sample_photo, seeded_augmentation
from .synthetic import SyntheticShapes

CALIBRATION_SOURCES = {
    "default": "bundled photos (random crops and flips) and synthetic shapes, half each: always available",
    "photos": "the bundled photos (cait.data.photos), random crops and flips",
    "synthetic": "synthetic shapes (cait.data.synthetic, split 'train')",
}
"""Named calibration sources; anything else is a tensor, a DataLoader or a directory of images."""


@dataclass(frozen=True)
class _Preprocess:
    """What the model expects of an image: side ``size`` in pixels, normalisation, centre-crop fraction."""

    size: int
    mean: tuple
    std: tuple
    crop_pct: float
    interpolation: str

    @classmethod
    def of(cls, model: torch.nn.Module) -> "_Preprocess":
        cfg = resolve_data_config({}, model=model)
        embed = getattr(model, "patch_embed", None)            # the size the model takes, if built at another one
        size = int(embed.img_size[-1]) if getattr(embed, "img_size", None) else cfg["input_size"][-1]
        return cls(size, cfg["mean"], cfg["std"], cfg.get("crop_pct", 0.875), cfg.get("interpolation", "bicubic"))

    def check(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """``x`` as float on the CPU if it is ``(N, 3, size, size)``, else a :class:`DataError`."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.size, self.size):
            raise DataError(f"{what}: calibration images must be (N, 3, {self.size}, {self.size}), got "
                            f"{tuple(x.shape)}")
        return x.float().cpu()


def calibration_images(source, n: int, model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """Unlabelled images for calibrating a model, preprocessed the way the model expects.

    Args:
        source: ``"default"``, ``"photos"`` or ``"synthetic"`` (:data:`CALIBRATION_SOURCES`); a tensor
            ``(N, 3, S, S)`` already normalised; a ``DataLoader`` (or any iterable) of such batches or of
            ``(images, ...)`` tuples; or a directory searched recursively for image files (an ImageFolder tree, or a
            flat folder), of which ``n`` are drawn at random (seeded) and centre-cropped; or a Hugging Face dataset
            ``hf:NAME[:CONFIG][@SPLIT]`` (:mod:`cait.data.hub`), ``n`` rows of its training split likewise.
        n: how many images (>= 1).
        model: the timm model they are for: input size, mean, std and crop from its ``pretrained_cfg``.
        seed: for the draw, the crops and the synthetic stream.

    Returns:
        ``(n, 3, S, S)`` float tensor on the CPU.

    Raises:
        DataError: an unknown name, a missing directory or one with no readable image, a tensor or loader of the
            wrong shape, or a loader that yields fewer than ``n`` images.
    """
    if n < 1:
        raise DataError(f"need at least one calibration image, got {n}")
    pre = _Preprocess.of(model)
    if isinstance(source, torch.Tensor):
        return _from_tensor(source, n, pre)
    if isinstance(source, (str, Path)):
        if str(source) in CALIBRATION_SOURCES:
            return _from_named(str(source), n, pre, seed)
        if is_hub(source):
            return _from_hub(str(source), n, pre, seed)
        return _from_directory(Path(source), n, pre, seed)
    return _from_batches(source, n, pre)


def _from_tensor(x: torch.Tensor, n: int, pre: _Preprocess) -> torch.Tensor:
    x = pre.check(x, "tensor")
    if len(x) < n:
        raise DataError(f"tensor: {len(x)} calibration images, {n} asked for")
    return x[:n]


def _from_named(name: str, n: int, pre: _Preprocess, seed: int) -> torch.Tensor:
    """Bundled photos with random crops and flips and/or synthetic shapes (``"default"``: half each)."""
    n_synth = n if name == "synthetic" else (n // 2 if name == "default" else 0)
    parts = []
    if n - n_synth:
        augment = create_transform(pre.size, is_training=True, scale=(0.25, 1.0), color_jitter=0.0,
                                   interpolation="bicubic", mean=pre.mean, std=pre.std)
        photos = [sample_photo(p) for p in SAMPLE_PHOTOS]
        with seeded_augmentation(seed):
            parts.append(torch.stack([augment(photos[i % len(photos)]) for i in range(n - n_synth)]))
    if n_synth:
        ds = SyntheticShapes(n_synth, pre.size, seed, "train", mean=pre.mean, std=pre.std)
        parts.append(torch.stack([ds[i][0] for i in range(n_synth)]))
    return torch.cat(parts)


def _from_directory(root: Path, n: int, pre: _Preprocess, seed: int) -> torch.Tensor:
    """``n`` image files drawn at random (seeded) from ``root`` and below, centre-cropped; unreadable ones skipped."""
    if not root.is_dir():
        raise DataError(f"{root}: no such directory (calibration data is 'default', 'photos', 'synthetic', a "
                        "directory of images, a tensor or a DataLoader)")
    files = list_images(root)
    random.Random(seed).shuffle(files)
    t = create_transform(pre.size, is_training=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation,
                         mean=pre.mean, std=pre.std)
    out = []
    for f in files:
        try:
            out.append(t(load_image(f)))
        except ImageError:
            continue                                   # a broken file among many: skip it
        if len(out) == n:
            return torch.stack(out)
    raise DataError(f"{root}: {len(out)} readable images found, {n} calibration images asked for")


def _from_hub(spec: str, n: int, pre: _Preprocess, seed: int) -> torch.Tensor:
    """``n`` rows drawn at random (seeded) from a Hub dataset's training split, centre-cropped."""
    train, _, image, _, _ = load_splits(spec, 0)
    if len(train) < n:
        raise DataError(f"{spec}: {len(train)} images, {n} calibration images asked for")
    rows = random.Random(seed).sample(range(len(train)), n)
    t = create_transform(pre.size, is_training=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation,
                         mean=pre.mean, std=pre.std)
    return torch.stack([t(train[i][image].convert("RGB")) for i in rows])


def _from_batches(source: Iterable, n: int, pre: _Preprocess) -> torch.Tensor:
    """The first ``n`` images of a DataLoader (or any iterable) of batches or ``(images, ...)`` tuples."""
    try:
        batches = iter(source)
    except TypeError:
        raise DataError(f"calibration data of type {type(source).__name__} is not supported") from None
    out, have = [], 0
    for b in batches:
        x = pre.check(b[0] if isinstance(b, (tuple, list)) else b, "DataLoader batch")
        out.append(x)
        have += len(x)
        if have >= n:
            return torch.cat(out)[:n]
    raise DataError(f"DataLoader: {have} calibration images, {n} asked for")
