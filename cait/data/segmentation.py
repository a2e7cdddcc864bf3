"""Segmentation data: per-pixel class maps for the synthetic shapes at any resolution, and a user's own folder.

Targets are ``(S, S)`` int64 class indices. The synthetic set has 9 classes: ``background`` (0) and the 8 shapes
(1..8, :data:`cait.data.synthetic.CLASSES` shifted by one), from the object mask the renderer already draws. A
folder of one's own::

    ROOT/train/images/<stem>.png|jpg|...     ROOT/train/masks/<stem>.png     (PNG of class indices, same size)
    ROOT/val/images/...                      ROOT/val/masks/...
    ROOT/classes.json                        optional: ["background", "road", ...] (else class_0, class_1, ...)

is checked whole before any training (:func:`check_folder`): a missing mask, a mask that is not a PNG, a mask whose
size differs from its image, a class index outside ``classes.json`` or above 255, an unreadable file — each refused
by the file's name, with every problem found listed (up to 20).

A Hugging Face dataset, ``hf:NAME[:CONFIG][@SPLIT]`` (:mod:`cait.data.hub`), gives its first ``Image`` column as the
image and its second as the mask (one class index per pixel, mode L or P; ``scene_parse_150`` has ``image`` and
``annotation``). The held-out split (its first ``val_size`` rows) and the first :data:`HUB_CHECK_ROWS` training rows
are checked like a folder before training (:func:`check_hub`), and the class count is the largest index found + 1;
a training mask with a larger index later stops the run with a :class:`DataError` naming its row.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .errors import DataError
from .hub import is_hub, load_splits
from .synthetic import CLASSES, IMAGENET_MEAN, IMAGENET_STD, SyntheticShapes

SYNTHETIC_SEG_CLASSES = ("background",) + tuple(CLASSES)
"""The synthetic set's segmentation classes: background, then the 8 shapes."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_CLASSES = 256
MAX_CLASSES_JSON_BYTES = 64_000
"""classes.json is read only up to this size (256 names of up to ~250 characters)."""
MAX_PROBLEMS = 20
HUB_CHECK_ROWS = 256
"""Training rows of a Hub segmentation dataset checked before training (all held-out rows are)."""


class SyntheticSegmentation(Dataset):
    """``ds[i]`` → ``(x (3, S, S) normalised, target (S, S) int64)``: sample ``i`` of the synthetic stream, its object
    pixels labelled ``1 + class``, the rest 0.

    Args:
        length: samples; img_size: side in pixels (any multiple of the patch); seed, split: as
            :class:`~cait.data.synthetic.SyntheticShapes` (``"val"`` is held out).
    """

    classes = SYNTHETIC_SEG_CLASSES

    def __init__(self, length: int, img_size: int = 224, seed: int = 0, split: str = "train") -> None:
        self.shapes = SyntheticShapes(length, img_size, seed, split)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        x, label, mask = self.shapes.tensor(index)
        return x, mask.long() * (label + 1)


@dataclass(frozen=True)
class FolderSample:
    image: Path
    mask: Path


def _classes(root: Path) -> list[str] | None:
    f = root / "classes.json"
    if not f.is_file():
        return None
    if f.stat().st_size > MAX_CLASSES_JSON_BYTES:                # read with a size bound ...
        raise DataError(f"{f}: larger than {MAX_CLASSES_JSON_BYTES:,} bytes (a list of class names)")
    try:
        names = json.loads(f.read_text())
    except (OSError, ValueError, RecursionError) as e:             # ... and a depth one (nested 30,000 deep)
        raise DataError(f"{f}: not a JSON list of class names ({type(e).__name__})") from None
    if not (isinstance(names, list) and 1 < len(names) <= MAX_CLASSES and all(isinstance(n, str) for n in names)):
        raise DataError(f"{f}: must be a list of 2 to {MAX_CLASSES} class names (index 0 first)")
    return names


def _pairs(split_dir: Path, problems: list[str]) -> list[FolderSample]:
    images, masks = split_dir / "images", split_dir / "masks"
    for d in (images, masks):
        if not d.is_dir():
            raise DataError(f"{d}: missing (a segmentation folder needs train/ and val/, each with images/ and masks/)")
    out = []
    for img in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        png = masks / f"{img.stem}.png"
        if png.is_file():
            out.append(FolderSample(img, png))
        else:
            other = sorted(p.name for p in masks.glob(f"{img.stem}.*"))
            problems.append(f"{img.name}: mask {other[0]} is not a PNG" if other else f"{img.name}: no mask "
                            f"masks/{img.stem}.png")
    if not out and not problems:
        raise DataError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return out


def _check_mask(name: str, mask: Image.Image, size: tuple[int, int], num_classes: int | None,
                named_by: str = "classes.json names") -> tuple[str | None, int]:
    """A problem with a mask for an image of ``size`` (or None), and its largest class index; ``named_by`` says where
    ``num_classes`` comes from."""
    if mask.mode not in ("L", "P", "I", "I;16"):
        return f"{name}: a mask holds one class index per pixel (mode L or P), got mode {mask.mode}", 0
    if mask.size != size:
        return f"{name}: {mask.size[0]}×{mask.size[1]}, its image is {size[0]}×{size[1]}", 0
    values = np.asarray(mask)
    top, low = int(values.max()), int(values.min())
    if low < 0:
        return f"{name}: class index {low} is negative (one index from 0 per pixel)", 0
    limit = num_classes if num_classes is not None else MAX_CLASSES
    if top >= limit:
        where = named_by if num_classes is not None else "at most"
        return f"{name}: class index {top} is out of range ({where} {limit} classes)", top
    return None, top


def _check_pair(s: FolderSample, num_classes: int | None) -> tuple[str | None, int]:
    """A problem with one image/mask pair (or None), and its largest class index."""
    try:
        with Image.open(s.image) as im:
            size = im.size
        with Image.open(s.mask) as m:
            if m.format != "PNG":                       # a JPEG or TIFF named .png: lossy or not an index map
                return f"{s.mask.name}: not a PNG file (its content is {m.format or 'unknown'})", 0
            return _check_mask(s.mask.name, m, size, num_classes)
    except (OSError, UnidentifiedImageError) as e:
        return f"{s.image.name}: unreadable ({type(e).__name__})", 0


def _refuse(where, problems: list[str]) -> None:
    """Raise a :class:`DataError` listing the first :data:`MAX_PROBLEMS` problems, if there are any."""
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS]) + (f"; and {len(problems) - MAX_PROBLEMS} more"
                                                        if len(problems) > MAX_PROBLEMS else "")
        raise DataError(f"{where}: {len(problems)} problem(s): {shown}")


def check_folder(root: str | Path) -> tuple[dict[str, list[FolderSample]], list[str]]:
    """Every image/mask pair of a segmentation folder, checked; returns ``({"train": [...], "val": [...]}, class
    names)``.

    Raises:
        DataError: naming each problem found (missing mask, non-PNG mask, size mismatch, class index out of range,
            unreadable file), or a missing ``train/``/``val/``/``images/``/``masks/``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data directory (expected {root}/train and {root}/val, or 'synthetic')")
    names = _classes(root)
    problems: list[str] = []
    splits = {split: _pairs(root / split, problems) for split in ("train", "val")}
    top = 0
    for pairs in splits.values():
        for s in pairs:
            problem, t = _check_pair(s, None if names is None else len(names))
            top = max(top, t)
            if problem:
                problems.append(problem)
    _refuse(root, problems)
    return splits, names or [f"class_{i}" for i in range(max(2, top + 1))]


class _PairSet(Dataset):
    """Image/mask pairs as ``(x (3, S, S) normalised, target (S, S) int64)``, both resized to ``img_size`` (bicubic
    image, nearest-neighbour mask), randomly flipped together when ``train``; subclasses give :meth:`pair`."""

    def __init__(self, classes: list[str], img_size: int, train: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.classes, self.img_size, self.train = classes, img_size, train
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def pair(self, index: int) -> tuple[Image.Image, Image.Image]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.pair(index)
        S = self.img_size
        image = image.convert("RGB").resize((S, S), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
        y = torch.from_numpy(np.array(mask.resize((S, S), Image.Resampling.NEAREST)).astype(np.int64))
        if self.train and random.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return (x - self.mean) / self.std, y


class SegmentationFolder(_PairSet):
    """A checked folder split (:func:`check_folder`) as :class:`_PairSet` pairs."""

    def __init__(self, samples: list[FolderSample], classes: list[str], img_size: int, train: bool,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__(classes, img_size, train, mean, std)
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def pair(self, index: int) -> tuple[Image.Image, Image.Image]:
        s = self.samples[index]
        return Image.open(s.image), Image.open(s.mask)


class HubSegmentation(_PairSet):
    """Rows of a Hub dataset (``datasets.Dataset``) as :class:`_PairSet` pairs: column ``image`` the image, column
    ``mask`` its class-index mask.

    Raises:
        DataError: from ``ds[i]``, for a mask whose class index is outside ``classes`` or whose size or mode is wrong
            (rows :func:`check_hub` did not see), naming the dataset and row.
    """

    def __init__(self, ds, image: str, mask: str, classes: list[str], img_size: int, train: bool, name: str,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__(classes, img_size, train, mean, std)
        self.ds, self.image, self.mask, self.name = ds, image, mask, name

    def __len__(self) -> int:
        return len(self.ds)

    def pair(self, index: int) -> tuple[Image.Image, Image.Image]:
        row = self.ds[int(index)]
        problem, _ = _check_mask(f"row {index}", row[self.mask], row[self.image].size, len(self.classes),
                                 "the checked rows have")
        if problem:
            raise DataError(f"{self.name}: {problem}")
        return row[self.image], row[self.mask]


def check_hub(spec: str, val_size: int) -> tuple:
    """``(train, held_out, image column, mask column, class names)`` of a Hub segmentation dataset; the held-out split
    is its first ``val_size`` rows.

    Raises:
        DataError: as :func:`cait.data.hub.load_splits`; no second ``Image`` column (the masks); or, listing each,
            the problems of the checked rows (mask mode or size, class index above 255, unreadable row).
    """
    train, held, image, _, others = load_splits(spec, val_size)
    if not others:
        raise DataError(f"{spec}: a segmentation dataset needs a second Image column with the masks (columns: "
                        f"{', '.join(train.features)})")
    mask = others[0]
    held = held.select(range(min(len(held), val_size)))
    problems, top = [], 0
    for split, ds in (("held-out", held), ("train", train.select(range(min(len(train), HUB_CHECK_ROWS))))):
        for i in range(len(ds)):
            try:
                row = ds[i]
                problem, t = _check_mask(f"{split} row {i}", row[mask], row[image].size, None)
            except (OSError, UnidentifiedImageError, ValueError) as e:
                problem, t = f"{split} row {i}: unreadable ({type(e).__name__})", 0
            top = max(top, t)
            if problem:
                problems.append(problem)
    _refuse(spec, problems)
    return train, held, image, mask, [f"class_{i}" for i in range(max(2, top + 1))]


def build_segmentation_sets(data: str, img_size: int, seed: int = 0, train_size: int = 2000, val_size: int = 500
                            ) -> tuple[Dataset, Dataset, list[str]]:
    """``(train, val, class names)`` for ``"synthetic"`` (``train_size`` and ``val_size`` images), a checked folder,
    or a checked Hub dataset ``hf:...`` (all its training rows, ``val_size`` held-out rows).

    Raises:
        DataError: for a folder that fails :func:`check_folder`, or a Hub dataset that fails :func:`check_hub`.
    """
    if data == "synthetic":
        return (SyntheticSegmentation(train_size, img_size, seed, "train"),
                SyntheticSegmentation(val_size, img_size, seed, "val"), list(SYNTHETIC_SEG_CLASSES))
    if is_hub(data):
        train, held, image, mask, classes = check_hub(data, val_size)
        return (HubSegmentation(train, image, mask, classes, img_size, True, data),
                HubSegmentation(held, image, mask, classes, img_size, False, data), classes)
    splits, classes = check_folder(data)
    return (SegmentationFolder(splits["train"], classes, img_size, train=True),
            SegmentationFolder(splits["val"], classes, img_size, train=False), classes)
