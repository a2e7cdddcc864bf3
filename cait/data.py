"""Training and evaluation data: the synthetic set or an ``ImageFolder`` tree, with step-indexed batches.

Batches are a pure function of ``(seed, step, rank)``: global sample position ``p = step·G + rank·B + i``
(G = global batch, B = per-process batch) maps to epoch ``p // n`` and a seeded permutation of that epoch. So a
resumed run sees exactly the batches the uninterrupted run would, and DDP ranks never overlap.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from .synthetic import CLASSES, SyntheticShapes


class DataError(ValueError):
    """A data source that cannot be used; the message says which path and why."""


class StepBatchSampler(Sampler[list[int]]):
    """Index batches for steps ``start, start+1, …, steps-1`` of one rank (see module docstring)."""

    def __init__(self, n: int, batch_size: int, steps: int, start: int = 0, rank: int = 0, world: int = 1,
                 seed: int = 0) -> None:
        self.n, self.B, self.steps, self.start, self.rank, self.world, self.seed = (
            n, batch_size, steps, start, rank, world, seed)
        self._perm: tuple[int, torch.Tensor] | None = None

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def batch(self, step: int) -> list[int]:
        """Dataset indices of this rank's batch at ``step`` (``B`` ints)."""
        G = self.B * self.world
        out = []
        for i in range(self.B):
            p = step * G + self.rank * self.B + i
            out.append(int(self._epoch_perm(p // self.n)[p % self.n]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


def build_datasets(data: str, img_size: int, seed: int = 0, synthetic_size: int = 20_000, val_size: int = 512,
                   mean=None, std=None) -> tuple[Dataset, Dataset, list[str]]:
    """``(train, val, class_names)`` for ``"synthetic"`` or an ImageFolder root with ``train/`` and ``val/``.

    ImageFolder trees use timm's transforms: training augmentation (random resized crop, flip, colour jitter) for
    ``train/``, resize + centre crop for ``val/``.

    Raises:
        DataError: missing root, missing or empty ``train/``/``val/``, or the two splits have different classes.
    """
    kw = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    if data == "synthetic":
        return (SyntheticShapes(synthetic_size, img_size, seed, "train", **kw),
                SyntheticShapes(val_size, img_size, seed, "val", **kw), list(CLASSES))
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"{root}: no such data directory (expected {root}/train and {root}/val, or 'synthetic')")
    sets = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"{d}: missing (an ImageFolder root needs train/ and val/ with one folder per class)")
        try:
            t = create_transform(img_size, is_training=split == "train", **kw)
            sets[split] = ImageFolder(str(d), transform=t, allow_empty=True)   # a class may lack val images
        except (FileNotFoundError, RuntimeError) as e:       # torchvision: no class folders
            raise DataError(f"{d}: no usable images ({e})") from None
        if len(sets[split]) == 0:
            raise DataError(f"{d}: no usable images (no image files in its class folders)")
    if sets["train"].classes != sets["val"].classes:
        raise DataError(f"{root}: train/ and val/ have different classes "
                        f"({len(sets['train'].classes)} vs {len(sets['val'].classes)})")
    return sets["train"], sets["val"], list(sets["train"].classes)


# ------------------------------------------------------------------------------------------------------------------
# Calibration images (unlabelled) for training-free compression
# ------------------------------------------------------------------------------------------------------------------
CALIBRATION_SOURCES = {
    "default": "bundled photos (random crops and flips) and synthetic shapes, half each: always available",
    "photos": "the bundled photos (cait.photos), random crops and flips",
    "synthetic": "synthetic shapes (cait.synthetic, split 'train')",
}
"""Named calibration sources; anything else is a tensor, a DataLoader or a directory of images."""
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_MAX_LISTED = 200_000


def calibration_images(source, n: int, model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """Unlabelled images for calibrating a model, preprocessed the way the model expects.

    Args:
        source: ``"default"``, ``"photos"`` or ``"synthetic"`` (:data:`CALIBRATION_SOURCES`); a tensor
            ``(N, 3, S, S)`` already normalised; a ``DataLoader`` (or any iterable) of such batches or of
            ``(images, ...)`` tuples; or a directory searched recursively for image files (an ImageFolder tree, or a
            flat folder), of which ``n`` are drawn at random (seeded) and centre-cropped.
        n: how many images (>= 1).
        model: the timm model they are for: input size, mean, std and crop from its ``pretrained_cfg``.
        seed: for the draw, the crops and the synthetic stream.

    Returns:
        ``(n, 3, S, S)`` float tensor on the CPU.

    Raises:
        DataError: an unknown name, a missing directory or one with no readable image, a tensor or loader of the
            wrong shape, or a loader that yields fewer than ``n`` images.
    """
    import random

    from timm.data import create_transform, resolve_data_config

    if n < 1:
        raise DataError(f"need at least one calibration image, got {n}")
    cfg = resolve_data_config({}, model=model)
    size, mean, std = cfg["input_size"][-1], cfg["mean"], cfg["std"]

    def check(x: torch.Tensor, what: str) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise DataError(f"{what}: calibration images must be (N, 3, {size}, {size}), got {tuple(x.shape)}")
        return x.float().cpu()

    if isinstance(source, torch.Tensor):
        x = check(source, "tensor")
        if len(x) < n:
            raise DataError(f"tensor: {len(x)} calibration images, {n} asked for")
        return x[:n]
    if isinstance(source, (str, Path)) and str(source) in CALIBRATION_SOURCES:
        name = str(source)
        n_synth = n if name == "synthetic" else (n // 2 if name == "default" else 0)
        parts = []
        if n - n_synth:
            from .photos import SAMPLE_PHOTOS, sample_photo
            augment = create_transform(size, is_training=True, scale=(0.25, 1.0), color_jitter=0.0,
                                       interpolation="bicubic", mean=mean, std=std)
            photos = [sample_photo(p) for p in SAMPLE_PHOTOS]
            rng_state = random.getstate()
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                random.seed(seed)
                parts.append(torch.stack([augment(photos[i % len(photos)]) for i in range(n - n_synth)]))
            random.setstate(rng_state)
        if n_synth:
            ds = SyntheticShapes(n_synth, size, seed, "train", mean=mean, std=std)
            parts.append(torch.stack([ds[i][0] for i in range(n_synth)]))
        return torch.cat(parts)
    if isinstance(source, (str, Path)):
        root = Path(source)
        if not root.is_dir():
            raise DataError(f"{root}: no such directory (calibration data is 'default', 'photos', 'synthetic', a "
                            "directory of images, a tensor or a DataLoader)")
        files = []
        for dirpath, dirnames, names in os.walk(root):
            dirnames.sort()
            files += [Path(dirpath) / f for f in sorted(names) if f.lower().endswith(_IMAGE_SUFFIXES)]
            if len(files) >= _MAX_LISTED:
                break
        random.Random(seed).shuffle(files)
        from .photos import ImageError, load_image
        t = create_transform(size, is_training=False, crop_pct=cfg.get("crop_pct", 0.875),
                             interpolation=cfg.get("interpolation", "bicubic"), mean=mean, std=std)
        out = []
        for f in files:
            try:
                out.append(t(load_image(f)))
            except ImageError:
                continue                                   # a broken file among many: skip it
            if len(out) == n:
                return torch.stack(out)
        raise DataError(f"{root}: {len(out)} readable images found, {n} calibration images asked for")
    try:
        batches = iter(source)
    except TypeError:
        raise DataError(f"calibration data of type {type(source).__name__} is not supported") from None
    out, have = [], 0
    for b in batches:
        x = check(b[0] if isinstance(b, (tuple, list)) else b, "DataLoader batch")
        out.append(x)
        have += len(x)
        if have >= n:
            return torch.cat(out)[:n]
    raise DataError(f"DataLoader: {have} calibration images, {n} asked for")
