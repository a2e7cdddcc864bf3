"""What the Attention tab analyses: a bundled photo, a held-out synthetic sample (with its object mask and label), or
a visitor's upload (validated: format, pixel count, decodable)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..data.photos import SAMPLE_PHOTOS, load_image, sample_photo
from ..data.synthetic import held_out_sample


@dataclass
class Sample:
    """An image to analyse. A synthetic sample is rendered at the model's input size and knows its object mask and
    label; a photo or an upload does not (the model's own resize and crop apply to it)."""

    image: Image.Image
    mask: torch.Tensor | None = None        # (S, S) bool
    label: str | None = None



SYNTHETIC_SAMPLES = {f"synthetic shapes, held-out #{i} (object mask known)": i for i in range(4)}
"""Samples of the held-out split of :mod:`cait.data.synthetic`, rendered at the model's input size."""


def sample_names() -> list[str]:
    """Bundled photos, then synthetic samples with known masks."""
    return list(SAMPLE_PHOTOS) + list(SYNTHETIC_SAMPLES)


def load_sample(name: str | None, upload, img_size: int, max_pixels: int) -> Sample:
    """The image to analyse: an upload (path, array or PIL) if given, else a bundled photo, else a held-out synthetic
    sample rendered at ``img_size`` pixels (the model's input size, so its mask aligns).

    Raises:
        cait.data.photos.ImageError: for an upload that is not a usable image or has more than ``max_pixels``.
        ValueError: if neither is given or the sample name is unknown.
    """
    if upload is not None and not (isinstance(upload, str) and not upload):
        return Sample(load_image(upload, max_pixels))
    if name in SAMPLE_PHOTOS:
        return Sample(sample_photo(name))
    if name in SYNTHETIC_SAMPLES:
        return Sample(*held_out_sample(SYNTHETIC_SAMPLES[name], img_size))
    raise ValueError("pick a bundled photo or upload an image")
