"""Figures and tables for the app and notebooks: attention overlays, retained channels, cost.

Pure functions of library results: plotly for interactive charts, matplotlib colormaps for overlays, pandas for
tables.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from plotly.subplots import make_subplots
from PIL import Image

from .flops import ModelSpec


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.55, cmap: str = "inferno") -> Image.Image:
    """Blend a heat map over an image.

    Args:
        image: RGB image (any size).
        heat: ``(h, w)`` map (any scale); upsampled bilinearly to the image and min-max normalised.
        alpha: weight of the heat map.
        cmap: a matplotlib colormap name.

    Returns:
        RGB image of ``image.size``.
    """
    W, H = image.size
    m = F.interpolate(heat[None, None].float(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    colored = colormaps[cmap](m.cpu().numpy())[..., :3]                          # (H, W, 3) in [0, 1]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    blended = ((1 - alpha) * base + alpha * colored).clip(0, 1)
    return Image.fromarray((255 * blended).astype(np.uint8))


def top_k(logits: torch.Tensor, labels: list[str] | None = None, k: int = 5) -> dict[str, float]:
    """``(num_classes,)`` logits → ``{label: probability}`` for the k most likely classes."""
    p = logits.float().softmax(-1)
    vals, idx = p.topk(min(k, p.numel()))
    return {(labels[i] if labels else f"class {i}"): float(v) for v, i in zip(vals.tolist(), idx.tolist())}


def channels_figure(original: ModelSpec, compressed: ModelSpec, title: str = "") -> go.Figure:
    """Retained channels per block (paper Fig. 6): q/k, v and FFN as % of the original, tokens per block on the right.

    Args:
        original, compressed: :func:`cait.flops.describe` of the two models (same depth).
    """
    blocks = list(range(1, len(original.blocks) + 1))
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for name, get in (("q/k", lambda b: b.heads * b.qk_dim), ("v", lambda b: b.heads * b.v_dim),
                      ("FFN", lambda b: b.ffn_dim)):
        kept = [100.0 * get(c) / get(o) for o, c in zip(original.blocks, compressed.blocks)]
        text = [f"{get(c)}/{get(o)}" for o, c in zip(original.blocks, compressed.blocks)]
        fig.add_bar(x=blocks, y=kept, name=f"{name} kept (%)", text=text, textposition="none",
                    hovertemplate="block %{x}: %{y:.1f}% (%{text})<extra>" + name + "</extra>")
    fig.add_scatter(x=blocks, y=[b.tokens for b in compressed.blocks], name="tokens (CLS incl.)",
                    mode="lines+markers", line=dict(color="black", dash="dot"), secondary_y=True)
    fig.update_layout(barmode="group", title=title or "Retained channels per block", xaxis_title="block",
                      legend=dict(orientation="h", y=-0.2), margin=dict(t=50, l=40, r=40, b=40), height=420)
    fig.update_yaxes(title_text="kept (% of original)", range=[0, 105], secondary_y=False)
    fig.update_yaxes(title_text="tokens", rangemode="tozero", secondary_y=True)
    return fig


def block_flops_figure(original: dict[str, int], compressed: dict[str, int]) -> go.Figure:
    """Per-part FLOPs (GFLOPs, multiply-adds) of two models, from :func:`cait.flops.flops_by_block`."""
    names = list(original)
    fig = go.Figure()
    for label, d in (("original", original), ("compressed", compressed)):
        fig.add_bar(x=names, y=[d.get(n, 0) / 1e9 for n in names], name=label)
    fig.update_layout(barmode="group", title="FLOPs per part (fvcore, multiply-adds)", yaxis_title="GFLOPs",
                      margin=dict(t=50, l=40, r=20, b=40), height=380, legend=dict(orientation="h", y=-0.25))
    return fig


def cost_table(rows: dict[str, dict]) -> pd.DataFrame:
    """Summary table from ``{name: {"flops", "params", "images_per_s"?}}``; the first row is the reference."""
    ref = next(iter(rows.values()))
    out = []
    for name, r in rows.items():
        row = {"model": name, "GFLOPs": round(r["flops"] / 1e9, 3), "params (M)": round(r["params"] / 1e6, 2),
               "FLOPs reduction (%)": round(100 * (1 - r["flops"] / ref["flops"]), 1)}
        if r.get("images_per_s"):
            row["images/s"] = round(r["images_per_s"], 1)
            row["speed-up"] = round(r["images_per_s"] / ref["images_per_s"], 2) if ref.get("images_per_s") else None
        out.append(row)
    return pd.DataFrame(out)
