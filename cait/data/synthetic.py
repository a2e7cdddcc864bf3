"""A procedural labelled data set: shapes on cluttered backgrounds, with a per-pixel object mask.

Real labelled images cannot be downloaded everywhere, so tests, offline demos and the attention-localisation measure
use this. Each image holds one object of one of :data:`CLASSES` — random position, size (22–40% of the side),
rotation and colour, with soft shading — on a cluttered background: a random colour gradient, 6–14 random line
segments and rectangles of other colours, and pixel noise. Clutter never uses a class shape, so the label is
unambiguous; the mask marks the object's pixels.

Version 2 (:data:`VERSION`): the diamond is a rhombus with diagonals 1 : 0.55. In version 1 it was a square turned
by 45°, which the random rotation made the same shape as the square (only their size ranges differed, and those
overlap), so no model could tell the two apart; the bundled weights trained on version 1 were retrained.

Everything is a pure function of ``(seed, split, index)``: the same call gives the same image at any time, on any
rank, at any resolution (the geometry is resolution-independent). Example::

    >>> ds = SyntheticShapes(length=1000, img_size=64, seed=0, split="val")
    >>> image, label, mask = ds.sample(3)       # PIL RGB 64×64, int in [0, 8), bool (64, 64)
    >>> x, y = ds[3]                             # normalised (3, 64, 64) tensor, int
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

VERSION = 2
"""Version of the rendering (recorded in the bundled weights' provenance); see the module docstring."""
CLASSES = ("circle", "ring", "square", "diamond", "triangle", "cross", "star", "hexagon")
_SPLITS = {"train": 0, "val": 1, "test": 2}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, s: float) -> np.ndarray:
    """Boolean mask of class ``cls`` on rotated, centred coordinates ``(u, v)`` with half-size ``s``."""
    r, th = np.hypot(u, v), np.arctan2(v, u)
    name = CLASSES[cls]
    if name == "circle":
        return r < s
    if name == "ring":
        return (r < s) & (r > 0.55 * s)
    if name == "square":
        return np.maximum(abs(u), abs(v)) < 0.8 * s
    if name == "diamond":                                               # a rhombus, not a turned square (v2)
        return abs(u) / s + abs(v) / (0.55 * s) < 1
    if name == "triangle":
        return (v < 0.5 * s) & (np.sqrt(3) * u - v < s) & (-np.sqrt(3) * u - v < s)
    if name == "cross":
        return ((abs(u) < s / 3) & (abs(v) < s)) | ((abs(v) < s / 3) & (abs(u) < s))
    if name == "star":
        return r < s * (0.55 + 0.45 * np.cos(5 * th)) ** 1.5 + 0.2 * s
    if name == "hexagon":
        return np.max([abs(u * math.cos(a) + v * math.sin(a)) for a in (0, math.pi / 3, 2 * math.pi / 3)],
                      axis=0) < 0.87 * s
    raise IndexError(cls)


def render(seed: int, split: str, index: int, img_size: int) -> tuple[np.ndarray, int, np.ndarray]:
    """One sample: ``(image (S, S, 3) uint8, label, mask (S, S) bool)``, a pure function of its arguments."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    S = img_size
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64) / S                      # resolution-independent [0, 1)
    label = int(rng.integers(len(CLASSES)))

    # Background: gradient between two colours, then clutter (segments and rectangles), then later noise.
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    ang = rng.uniform(0, 2 * math.pi)
    t = (np.cos(ang) * xx + np.sin(ang) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    img = c0 + (c1 - c0) * t[..., None]
    for _ in range(int(rng.integers(6, 15))):
        col = rng.uniform(0, 1, 3)
        if rng.random() < 0.5:                                               # a thick line segment
            (x0, y0), (x1, y1) = rng.uniform(0, 1, (2, 2))
            dx, dy = x1 - x0, y1 - y0
            L2 = max(dx * dx + dy * dy, 1e-9)
            p = np.clip(((xx - x0) * dx + (yy - y0) * dy) / L2, 0, 1)
            d = np.hypot(xx - (x0 + p * dx), yy - (y0 + p * dy))
            m = d < rng.uniform(0.004, 0.015)
        else:                                                                # an axis-aligned thin rectangle
            x0, y0 = rng.uniform(0, 1, 2)
            w, h = rng.uniform(0.02, 0.25), rng.uniform(0.01, 0.05)
            if rng.random() < 0.5:
                w, h = h, w
            m = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
        img[m] = col

    # The object: random size, centre (fully inside), rotation, colour far from the local background.
    s = rng.uniform(0.11, 0.20)
    cx, cy = rng.uniform(s + 0.02, 1 - s - 0.02, 2)
    rot = rng.uniform(0, 2 * math.pi)
    u = (xx - cx) * math.cos(rot) + (yy - cy) * math.sin(rot)
    v = -(xx - cx) * math.sin(rot) + (yy - cy) * math.cos(rot)
    mask = _shape_mask(label, u, v, s)
    bg = img[mask].mean(0) if mask.any() else img.mean((0, 1))
    col = rng.uniform(0, 1, 3)
    for _ in range(8):                                                       # keep the object visible
        if np.abs(col - bg).sum() > 0.9:
            break
        col = rng.uniform(0, 1, 3)
    shade = 0.8 + 0.2 * np.cos(np.hypot(u, v) / s * math.pi / 2)
    img[mask] = (col * shade[..., None])[mask]

    img = img + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), label, mask


def held_out_sample(index: int, img_size: int, seed: int = 0) -> tuple[Image.Image, torch.Tensor, str]:
    """Held-out sample ``index`` (split ``val``) rendered at ``img_size``: ``(PIL RGB, (S, S) bool object mask,
    class name)``. The app's synthetic samples; the mask aligns with the pixels the model sees."""
    img, label, mask = render(seed, "val", index, img_size)
    return Image.fromarray(img), torch.from_numpy(mask), CLASSES[label]


class SyntheticShapes(Dataset):
    """Fixed-size (``length``) view of the endless synthetic stream; ``ds[i]`` → ``(x (3, S, S), label)``.

    Args:
        length: number of samples (index ``i`` is sample ``i`` of the stream; any ``i`` is valid for
            :meth:`sample`, so the stream is endless).
        img_size: side in pixels.
        seed: data set seed.
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint streams).
        mean, std: normalisation (ImageNet's by default, as DeiT expects).
        masks: ``ds[i]`` also returns the ``(S, S)`` bool object mask (for token labelling,
            :mod:`cait.finetune.token_labels`).
    """

    classes = CLASSES

    def __init__(self, length: int = 10_000, img_size: int = 224, seed: int = 0, split: str = "train",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, masks: bool = False) -> None:
        if length < 1 or img_size < 8:
            raise ValueError(f"need length >= 1 and img_size >= 8, got {length}, {img_size}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        self.length, self.img_size, self.seed, self.split, self.masks = length, img_size, seed, split, masks
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[Image.Image, int, np.ndarray]:
        """``(PIL RGB image, label, mask (S, S) bool)`` for stream index ``index``."""
        img, label, mask = render(self.seed, self.split, index, self.img_size)
        return Image.fromarray(img), label, mask

    def normalise(self, img: np.ndarray) -> torch.Tensor:
        """``(S, S, 3)`` uint8 → normalised ``(3, S, S)`` float tensor."""
        x = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
        return (x - self.mean) / self.std

    @staticmethod
    def normalise_image(image: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
        """A PIL RGB image as it is (no resize) → normalised ``(3, S, S)`` float tensor (ImageNet statistics)."""
        x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div(255)
        return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)

    def tensor(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Normalised ``(3, S, S)`` image, label, ``(S, S)`` bool mask."""
        img, label, mask = render(self.seed, self.split, index, self.img_size)
        return self.normalise(img), label, torch.from_numpy(mask)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        x, y, mask = self.tensor(index)
        return (x, y, mask) if self.masks else (x, y)


def export_imagefolder(root: str | Path, n_train: int = 800, n_val: int = 200, img_size: int = 224, seed: int = 0,
                       masks: bool = True) -> Path:
    """Write ``root/{train,val}/<class>/<index>.png`` (and ``root/masks/val/<class>/<index>.png``).

    The tree loads with ``torchvision.datasets.ImageFolder`` / ``python -m cait.finetune --data root``.
    """
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            if masks and split == "val":
                (root / "masks" / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, label, mask = render(seed, split, i, img_size)
            Image.fromarray(img).save(root / split / CLASSES[label] / f"{i:06d}.png")
            if masks and split == "val":
                mask_path = root / "masks" / split / CLASSES[label] / f"{i:06d}.png"
                Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    return root
