"""Images in: bundled real photos, validation of user uploads, and the model's preprocessing.

The bundled photos come from packages already installed with the project (no download): scikit-image's
``skimage.data`` (astronaut, chelsea, coffee, rocket; public domain or CC0, see scikit-image's data licence) and
matplotlib's ``grace_hopper.jpg`` sample (public domain).
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

MAX_PIXELS = 40_000_000
"""Uploads above this many pixels (40 MP) are refused, before decoding where the header allows."""
MIN_SIDE = 8
DISPLAY_SIDE = 1024
"""Larger images are downscaled to this longest side (pixels) on load; the model sees 224 px anyway."""


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""File names read as images from a directory of one's own (case-insensitive)."""
MAX_LISTED = 200_000
"""At most this many image files are listed from one directory tree."""


class ImageError(ValueError):
    """An input that is not a usable image; the message says why."""


def list_images(root: Path, limit: int = MAX_LISTED) -> list[Path]:
    """Image files (:data:`IMAGE_SUFFIXES`) in ``root`` and below, in a fixed order (directories and names sorted),
    at most about ``limit`` of them."""
    files: list[Path] = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames.sort()
        files += [Path(dirpath) / f for f in sorted(names) if f.lower().endswith(IMAGE_SUFFIXES)]
        if len(files) >= limit:
            break
    return files


SAMPLE_PHOTOS: dict[str, str] = {
    "astronaut (scikit-image)": "skimage:astronaut",
    "cat: chelsea (scikit-image)": "skimage:chelsea",
    "coffee (scikit-image)": "skimage:coffee",
    "rocket (scikit-image)": "skimage:rocket",
    "Grace Hopper (matplotlib)": "matplotlib:grace_hopper.jpg",
}


def item_seed(seed: int, index: int, held_out: bool = False) -> int:
    """The augmentation seed of item ``index`` of a dataset seeded ``seed`` (its held-out split apart), for
    :func:`seeded_augmentation`: a pure function of the three, in ``[0, 2**31)``."""
    return (seed * 1_000_003 + held_out * 500_009 + int(index)) % 2**31


@contextlib.contextmanager
def seeded_augmentation(seed: int):
    """Run timm's random transforms under ``seed`` (torch's and Python's generators), then restore both, so an
    augmented image is a pure function of ``seed`` and the caller's random streams are untouched."""
    state = random.getstate()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


@functools.lru_cache(maxsize=None)
def sample_photo(name: str) -> Image.Image:
    """One bundled photo as an RGB PIL image.

    Raises:
        KeyError: for a name not in :data:`SAMPLE_PHOTOS`.
    """
    source, item = SAMPLE_PHOTOS[name].split(":", 1)
    if source == "skimage":
        import skimage.data
        return Image.fromarray(getattr(skimage.data, item)()).convert("RGB")
    from matplotlib import cbook
    with cbook.get_sample_data(item) as f:
        return Image.open(f).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")   # transparent → white
    if img.mode in ("I", "I;16", "I;16B", "F"):
        a = np.asarray(img, dtype=np.float32)                         # 4 bytes a pixel, not 8
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12) * 255
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def load_image(src: str | os.PathLike | Image.Image | np.ndarray, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any image a user gives us → an RGB PIL image (grayscale, palette, 16-bit, RGBA and CMYK handled).

    Images larger than :data:`DISPLAY_SIDE` are downscaled (aspect kept).

    Args:
        src: a file path, a PIL image, or an array ``(H, W)``, ``(H, W, 1|3|4)`` of uint8 or floats in [0, 1].

    Raises:
        ImageError: not an image, unreadable or truncated, more than ``max_pixels`` pixels (default
            :data:`MAX_PIXELS`; checked from the header, before decoding, where the format allows), or smaller than
            :data:`MIN_SIDE` pixels on a side.
    """
    if isinstance(src, np.ndarray):
        a = src
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
            raise ImageError(f"an image array must be (H, W) or (H, W, 1|3|4), got shape {a.shape}")
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
        img = Image.fromarray(a)
    elif isinstance(src, Image.Image):
        img = src
    else:
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"{path.name}: no such file")
        try:
            img = Image.open(path)
            if img.width * img.height > max_pixels:
                raise ImageError(f"{path.name}: {img.width}×{img.height} is too large "
                                 f"(at most {max_pixels / 1e6:g} MP)")
            img.load()
        except ImageError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise ImageError(f"{path.name}: not an image we can read ({type(e).__name__})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{path.name}: unreadable or truncated image ({e})") from None
    if img.width * img.height > max_pixels:
        raise ImageError(f"image of {img.width}×{img.height} is too large (at most {max_pixels / 1e6:g} MP)")
    if min(img.size) < MIN_SIDE:
        raise ImageError(f"image of {img.width}×{img.height} is too small (at least {MIN_SIDE} px a side)")
    img = _to_rgb(img)
    if max(img.size) > DISPLAY_SIDE:
        img.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.BICUBIC)
    return img


def eval_transform(model: nn.Module):
    """timm's evaluation transform for a model (resize, center crop, normalise), from its pretrained config."""
    return create_transform(**resolve_data_config({}, model=model))


def preprocess(model: nn.Module, images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images → the model's input batch ``(B, 3, S, S)`` with timm's evaluation transform."""
    t = eval_transform(model)
    return torch.stack([t(im) for im in images])


def model_view(model: nn.Module, image: Image.Image) -> Image.Image:
    """The crop of ``image`` the model actually sees (resize + center crop, before normalisation), as RGB."""
    cfg = resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    scaled = int(size / cfg.get("crop_pct", 1.0))
    return Compose([Resize(scaled, interpolation=InterpolationMode.BICUBIC), CenterCrop(size)])(image)
