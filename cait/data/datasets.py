"""Training and evaluation data: the synthetic set, the bundled photos, an ``ImageFolder`` tree, a folder of images
without classes, or a Hub dataset, with step-indexed batches.

Batches are a pure function of ``(seed, step, rank)``: global sample position ``p = step·G + rank·B + i``
(G = global batch, B = per-process batch) maps to epoch ``p // n`` and a seeded permutation of that epoch. So a
resumed run sees exactly the batches the uninterrupted run would, and DDP ranks never overlap.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch
from timm.data import create_transform
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder

from .errors import DataError
from .hub import HubImages, is_hub, load_splits
from .photos import (
    IMAGE_SUFFIXES,
    SAMPLE_PHOTOS,
    ImageError,
    item_seed,
    list_images,
    load_image,
    sample_photo,
    seeded_augmentation,
)
from .synthetic import CLASSES, SyntheticShapes


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


class Unlabelled(Dataset):
    """A dataset's images without their labels: item ``i`` is ``(image, 0)`` whatever the label was, for label-free
    distillation (the 0 only keeps the batch shape Mixup/CutMix expect; nothing reads it)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        return self.dataset[i][0], 0


class PhotoCrops(Dataset):
    """Random crops and flips of the bundled photos (:data:`cait.data.photos.SAMPLE_PHOTOS`), unlabelled: item ``i``
    is ``(image (3, S, S), 0)``, a pure function of ``(seed, split, i)`` (timm's training transform under a fixed
    seed), so resumed runs see the same images. For label-free distillation on images the app always has."""

    def __init__(self, length: int, img_size: int, seed: int = 0, split: str = "train", mean=None, std=None) -> None:
        kw = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        self.length, self.seed, self.split = length, seed, split
        self.transform = create_transform(img_size, is_training=True, scale=(0.1, 1.0), color_jitter=0.2, **kw)
        self.photos = [sample_photo(p) for p in SAMPLE_PHOTOS]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple:
        with seeded_augmentation(item_seed(self.seed, i, held_out=self.split == "val")):
            x = self.transform(self.photos[int(i) % len(self.photos)])
        return x, 0


class ImageFiles(Dataset):
    """Image files of one's own, unlabelled: item ``i`` is ``(transform(files[i]), 0)``. Training crops and flips are
    a pure function of ``(seed, i)`` (as :class:`PhotoCrops`), so a resumed run sees the same images; a file that
    cannot be read is replaced by the next readable one (a broken file among thousands must not end a long run).

    Raises:
        DataError: from ``ds[i]``, when neither that file nor the next 9 can be read (naming the first).
    """

    def __init__(self, files: list[Path], transform, seed: int = 0, augment: bool = False) -> None:
        self.files, self.transform, self.seed, self.augment = files, transform, seed, augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple:
        for j in range(int(i), int(i) + 10):
            try:
                image = load_image(self.files[j % len(self.files)])
            except ImageError:
                continue
            if not self.augment:
                return self.transform(image), 0
            with seeded_augmentation(item_seed(self.seed, i)):
                return self.transform(image), 0
        raise DataError(f"{self.files[int(i)].name}: unreadable, and so are the 9 image files after it")


def _image_files(root: Path, img_size: int, seed: int, val_size: int, kw: dict) -> tuple[Dataset, Dataset, list]:
    """A folder of images without ``train/`` and ``val/`` (any layout below it; sub-folders are not classes): a
    seeded ``min(val_size, n // 5)`` of its ``n`` images held out, the rest for training, no classes (label-free
    runs only)."""
    files = list_images(root)
    if len(files) < 5:
        raise DataError(f"{root}: {len(files)} image files ({', '.join(IMAGE_SUFFIXES)}); at least 5 are needed, one "
                        "in five held out (or give train/ and val/ folders of classes)")
    random.Random(seed).shuffle(files)
    held = min(val_size, len(files) // 5)
    return (ImageFiles(files[held:], create_transform(img_size, is_training=True, **kw), seed, augment=True),
            ImageFiles(files[:held], create_transform(img_size, is_training=False, **kw)), [])


def build_datasets(data: str, img_size: int, seed: int = 0, synthetic_size: int = 20_000, val_size: int = 512,
                   mean=None, std=None) -> tuple[Dataset, Dataset, list[str]]:
    """``(train, val, class_names)`` for ``"synthetic"``, ``"photos"`` (:class:`PhotoCrops`, no labels), an
    ImageFolder root with ``train/`` and ``val/``, a folder of images with neither (:class:`ImageFiles`, no labels;
    ``val_size`` of them held out, at most one in five), or a Hugging Face dataset ``hf:NAME[:CONFIG][@SPLIT]``
    (:mod:`cait.data.hub`).

    Folders and Hub datasets use timm's transforms: training augmentation (random resized crop, flip, colour
    jitter) for the training split, resize + centre crop for the held-out one. The photos, a folder without
    ``train/`` and ``val/`` and a Hub dataset without a ``ClassLabel`` column have no class names (``[]``): only
    label-free runs can use them.

    Raises:
        DataError: missing root, missing or empty ``train/``/``val/`` (a folder with one of them), the two splits
            have different classes, a folder of fewer than 5 images, or a Hub dataset that
            cannot be loaded (:func:`cait.data.hub.load_splits`).
    """
    kw = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    if data == "synthetic":
        return (SyntheticShapes(synthetic_size, img_size, seed, "train", **kw),
                SyntheticShapes(val_size, img_size, seed, "val", **kw), list(CLASSES))
    if data == "photos":                                    # unlabelled: label-free runs only
        return (PhotoCrops(synthetic_size, img_size, seed, "train", **kw),
                PhotoCrops(val_size, img_size, seed, "val", **kw), [])
    if is_hub(data):
        train, held, image, label, _ = load_splits(data, val_size)
        sets = [HubImages(d, image, label, create_transform(img_size, is_training=t, **kw))
                for d, t in ((train, True), (held, False))]
        return sets[0], sets[1], sets[0].classes
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"{root}: no such data directory (expected {root}/train and {root}/val, or 'synthetic')")
    if not (root / "train").is_dir() and not (root / "val").is_dir():
        return _image_files(root, img_size, seed, val_size, kw)
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


