"""The app's engine: builds and caches (original, CAIT twin) pairs and answers each tab's question.

Everything here is plain Python returning PIL images, plotly figures and pandas tables, so it is testable without a
browser; ``app.py`` only lays out widgets and calls it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn as nn
from PIL import Image

from .attention import cls_attention
from .bench import compare_throughput, resolve_device
from .compress import compress
from .flops import count_params, describe, flops_by_block
from .merge import format_layout, parse_layout
from .models import DEIT_MODELS, WeightsInfo, create_model
from .photos import SAMPLE_PHOTOS, load_image, model_view, preprocess, sample_photo
from .viz import block_flops_figure, channels_figure, cost_table, overlay, top_k


@dataclass
class ModelPair:
    """An original DeiT and its compressed twin, on one device."""

    name: str
    flops_reduction: float
    merge: str
    original: nn.Module
    compressed: nn.Module
    weights: WeightsInfo
    device: torch.device
    _flops: dict = field(default_factory=dict)

    def flops(self) -> dict[str, dict[str, int]]:
        """fvcore FLOPs per part for both models, computed once."""
        if not self._flops:
            self._flops = {"original": flops_by_block(self.original), "compressed": flops_by_block(self.compressed)}
        return self._flops


@dataclass
class AttentionView:
    """What the Attention tab shows for one image."""

    image: Image.Image                      # the crop the models see
    original_mean: Image.Image              # head-mean CLS attention overlay
    compressed_mean: Image.Image
    original_heads: list[tuple[Image.Image, str]]
    compressed_heads: list[tuple[Image.Image, str]]
    original_top5: dict[str, float]
    compressed_top5: dict[str, float]
    grids: tuple[tuple[int, int], tuple[int, int]]


class Studio:
    """Builds model pairs on demand and keeps the most recent ones.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
        pretrained: try timm's ImageNet weights (falls back to random initialisation, visibly).
        cache_size: model pairs kept in memory.
    """

    def __init__(self, device: str | None = None, pretrained: bool = True, cache_size: int = 2) -> None:
        self.device = resolve_device(device)
        self.pretrained = pretrained
        self.cache_size = cache_size
        self._originals: OrderedDict[str, tuple[nn.Module, WeightsInfo]] = OrderedDict()
        self._pairs: OrderedDict[tuple, ModelPair] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def model_choices() -> dict[str, str]:
        """Display name → timm name."""
        return {v: k for k, v in DEIT_MODELS.items()}

    def _original(self, name: str) -> tuple[nn.Module, WeightsInfo]:
        if name not in self._originals:
            model, info = create_model(name, pretrained=self.pretrained)
            self._originals[name] = (model.to(self.device), info)
            while len(self._originals) > self.cache_size:
                self._originals.popitem(last=False)
        self._originals.move_to_end(name)
        return self._originals[name]

    def pair(self, name: str, flops_reduction: float, merge: str | None = "") -> ModelPair:
        """The (original, compressed) pair for these settings, built once and cached.

        Args:
            name: timm name or display name (``"DeiT-Small"``).
            flops_reduction: total FLOPs reduction in [0, 1).
            merge: optional ATME layout such as ``"h4,v7"``; empty for the planned one.

        Raises:
            ValueError: unknown model, bad layout, or an unreachable FLOPs target (message says which).
        """
        name = self.model_choices().get(name, name)
        layout = format_layout(parse_layout(merge or None)) or None
        key = (name, round(float(flops_reduction), 4), layout)
        with self._lock:
            if key not in self._pairs:
                original, info = self._original(name)
                compressed = compress(original, float(flops_reduction), layout=layout).to(self.device)
                self._pairs[key] = ModelPair(name, float(flops_reduction), compressed.cait_meta["merge"], original,
                                             compressed, info, self.device)
                while len(self._pairs) > self.cache_size:
                    self._pairs.popitem(last=False)
            self._pairs.move_to_end(key)
            return self._pairs[key]

    def status(self, pair: ModelPair) -> str:
        """Markdown: device, where the weights came from, and what the twin is."""
        meta = pair.compressed.cait_meta
        f = pair.flops()
        fo, fc = sum(f["original"].values()), sum(f["compressed"].values())
        weights = (f"**Weights:** {pair.weights.detail}." if pair.weights.trained else
                   f"**Weights: not trained** — {pair.weights.detail}. Attention maps and predictions of random "
                   "weights mean nothing; the FLOPs, channel and speed figures are still exact.")
        return "\n\n".join([
            f"**Device:** `{pair.device}` · **Model:** {DEIT_MODELS.get(pair.name, pair.name)} (`{pair.name}`)",
            weights,
            f"**CAIT twin:** ATME layout `{meta['merge'] or 'none'}` ({100 * meta['atme_reduction']:.1f}% of FLOPs) "
            f"+ CDCP channel pruning → {fo / 1e9:.3f} → {fc / 1e9:.3f} GFLOPs "
            f"({100 * (1 - fc / fo):.1f}% fewer). *Untrained preview:* channels chosen by weight-row norms, "
            "without the CDCP fine-tuning that gives CAIT its accuracy.",
        ])

    @staticmethod
    def image(sample: str | None = None, upload=None) -> Image.Image:
        """The image to analyse: an upload (path, array or PIL) if given, else a bundled photo.

        Raises:
            ImageError: for an upload that is not a usable image.
            ValueError: if neither is given or the sample name is unknown.
        """
        if upload is not None and not (isinstance(upload, str) and not upload):
            return load_image(upload)
        if sample in SAMPLE_PHOTOS:
            return sample_photo(sample)
        raise ValueError("pick a bundled photo or upload an image")

    @torch.no_grad()
    def attention(self, pair: ModelPair, image: Image.Image, block: int = -1) -> AttentionView:
        """CLS attention of both models in one block (default: the last), head-mean and per head, with top-5."""
        x = preprocess(pair.original, [image]).to(self.device)
        view = model_view(pair.original, image)
        labels = _labels(pair.original)
        res = {}
        for which, model in (("original", pair.original), ("compressed", pair.compressed)):
            a = cls_attention(model, x, block)
            heads = [(overlay(view, a.patch_maps[0, h]), f"head {h + 1}") for h in range(a.patch_maps.shape[1])]
            res[which] = (overlay(view, a.mean()[0]), heads, top_k(a.logits[0], labels), a.grid)
        o, c = res["original"], res["compressed"]
        return AttentionView(view, o[0], c[0], o[1], c[1], o[2], c[2], (o[3], c[3]))

    def channels(self, pair: ModelPair) -> go.Figure:
        """Retained q/k, v and FFN channels per block (paper Fig. 6)."""
        return channels_figure(describe(pair.original), describe(pair.compressed),
                               title=f"{DEIT_MODELS.get(pair.name, pair.name)}: retained channels per block "
                                     f"(ATME {pair.merge or 'none'})")

    def cost(self, pair: ModelPair, measure: bool = False, batch_size: int = 8, iters: int = 3
             ) -> tuple[pd.DataFrame, go.Figure]:
        """FLOPs, params and (optionally) measured throughput of both models, and per-block FLOPs."""
        f = pair.flops()
        rows = {k: {"flops": sum(f[k].values()), "params": count_params(m)}
                for k, m in (("original", pair.original), ("compressed", pair.compressed))}
        if measure:
            speed = compare_throughput({"original": pair.original, "compressed": pair.compressed},
                                       batch_size=int(batch_size), device=self.device, warmup=1, iters=iters,
                                       rounds=2)
            for k in rows:
                rows[k]["images_per_s"] = speed[k]["images_per_s"]
        table = cost_table(rows)
        table.insert(1, "device", str(self.device))
        return table, block_flops_figure(f["original"], f["compressed"])


def _labels(model: nn.Module) -> list[str] | None:
    if getattr(model, "num_classes", 0) != 1000:
        return None
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]
