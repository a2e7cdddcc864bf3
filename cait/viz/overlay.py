"""Images for the app and notebooks: heat maps (CLS attention) blended over an image with a colour scale, small inputs
shown upscaled, and the top-k classes of a logit vector."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw


MIN_DISPLAY_SIDE = 224
"""Images smaller than this (a 32-px test model's input) are upscaled, pixels kept sharp, before maps are drawn."""



def display_view(image: Image.Image) -> Image.Image:
    """The image as shown: upscaled (nearest neighbour) to at least :data:`MIN_DISPLAY_SIDE` on its short side."""
    short = min(image.size)
    if short >= MIN_DISPLAY_SIDE:
        return image
    k = -(-MIN_DISPLAY_SIDE // short)
    return image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)



def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.55, cmap: str = "inferno",
            scale: bool = False, vrange: tuple[float, float] | None = None) -> Image.Image:
    """Blend a heat map over an image, optionally with a colour scale beside it.

    Args:
        image: RGB image (any size; small ones are upscaled, :func:`display_view`).
        heat: ``(h, w)`` map (any scale); upsampled bilinearly to the image.
        alpha: weight of the heat map.
        cmap: a matplotlib colormap name.
        scale: add a vertical colour bar labelled with the ends of the colour scale, as a percentage of the map's
            total (for CLS attention: the share of the CLS token's attention on one patch).
        vrange: ``(low, high)`` shares of the map's total (0..1) that the colour scale spans, so that several maps
            can share one scale (:func:`shared_range`); None: the map's own minimum and maximum (min-max).

    Returns:
        RGB image: ``image.size`` (upscaled if small), wider by the colour bar when ``scale``.
    """
    image = display_view(image)
    W, H = image.size
    share = heat.float() / (float(heat.float().sum()) or 1.0)                  # each cell's share of the total
    lo, hi = (float(share.min()), float(share.max())) if vrange is None else vrange
    m = F.interpolate(share[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    m = ((m - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
    colored = colormaps[cmap](m.cpu().numpy())[..., :3]                          # (H, W, 3) in [0, 1]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    blended = Image.fromarray((255 * ((1 - alpha) * base + alpha * colored).clip(0, 1)).astype(np.uint8))
    return _with_colour_bar(blended, (lo, hi), cmap) if scale else blended


def shared_range(*heats: torch.Tensor) -> tuple[float, float]:
    """One colour scale for several maps: the lowest and highest share of its own total any cell of any map has.

    >>> shared_range(torch.tensor([[1., 3.]]), torch.tensor([[1., 1.]]))
    (0.25, 0.75)
    """
    shares = [h.float() / (float(h.float().sum()) or 1.0) for h in heats]
    return min(float(s.min()) for s in shares), max(float(s.max()) for s in shares)


def _with_colour_bar(img: Image.Image, vrange: tuple[float, float], cmap: str) -> Image.Image:
    """``img`` with a colour bar on its right: top = the scale's high end, bottom = its low end, in %."""
    W, H = img.size
    bar_w, pad = max(12, W // 20), max(46, W // 5)
    out = Image.new("RGB", (W + bar_w + pad, H), "white")
    out.paste(img, (0, 0))
    ramp = colormaps[cmap](np.linspace(1, 0, H))[:, :3]                           # top: high
    out.paste(Image.fromarray((255 * np.repeat(ramp[:, None], bar_w, 1)).astype(np.uint8)), (W + 4, 0))
    draw = ImageDraw.Draw(out)
    for y, v in ((2, vrange[1]), (H - 12, vrange[0])):
        draw.text((W + bar_w + 7, y), f"{100 * v:.1f}%", fill="black")
    return out


def top_k(logits: torch.Tensor, labels: list[str] | None = None, k: int = 5) -> dict[str, float]:
    """``(num_classes,)`` logits → ``{label: probability}`` for the k most likely classes."""
    p = logits.float().softmax(-1)
    vals, idx = p.topk(min(k, p.numel()))
    return {(labels[i] if labels else f"class {i}"): float(v) for v, i in zip(vals.tolist(), idx.tolist())}
