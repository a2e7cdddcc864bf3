"""The Attention tab's answer: both models' CLS attention in one block, head-mean and per head, with top-5, and for a
synthetic sample the share of CLS attention inside its object (paper Fig. 8, :mod:`cait.measure.attention`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..data.photos import model_view, preprocess
from ..data.synthetic import SyntheticShapes
from ..measure.attention import attention_in_mask, cls_attention
from ..viz.overlay import display_view, overlay, shared_range, top_k
from .pairs import ModelPair
from .samples import Sample
from .status import classes_note, model_labels


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
    localisation: tuple[float, float] | None = None   # CLS attention mass inside the object (original, twin)
    object_area: float | None = None                  # the object's share of the image (uniform attention's score)
    true_label: str | None = None                     # known for synthetic samples
    classes_note: str = ""                            # what the model's classes are
    shared_range: tuple[float, float] | None = None   # the one colour scale of both head-mean maps, or None
    query: str = "cls"                                # "map" / "mean" for a model without a class token

    def scale_text(self) -> str:
        """Which colour scale the head-mean maps are on."""
        if self.shared_range is None:
            return "**Colour scale:** each map on its own range (min to max), so their colours do not compare."
        lo, hi = self.shared_range
        what = {"cls": "the CLS token's attention",
                "map": "the attention of the attention-pooling (MAP) head's query (this model has no class token)"
                }.get(self.query, "the attention each patch receives, averaged over all tokens (this model has no "
                                  "class token)")
        return (f"**Colour scale:** shared by both maps, {100 * lo:.1f}% to {100 * hi:.1f}% of {what} per patch: "
                "a flatter map looks flatter.")

    def localisation_text(self) -> str:
        """Markdown for the UI: the model's classes, the true label if known, and the attention localisation."""
        lines = [self.scale_text()] + ([self.classes_note] if self.classes_note else [])
        if self.true_label is not None:
            lines.append(f"**True label:** {self.true_label}.")
        if self.localisation is None:
            lines.append("Attention localisation: needs a sample with a known object mask (the synthetic ones).")
        else:
            o, c = self.localisation
            lines.append(f"**Attention inside the object:** original {100 * o:.1f}%, CAIT twin {100 * c:.1f}% "
                         f"(the object covers {100 * self.object_area:.1f}% of the image: uniform attention scores "
                         "that).")
        return "\n\n".join(lines)


@torch.no_grad()
def attention_view(pair: ModelPair, sample: Sample, block: int = -1, shared_scale: bool = True) -> AttentionView:
    """CLS attention of both models in one block (default: the last), head-mean and per head, with top-5.

    ``shared_scale``: both head-mean maps on one colour scale (default), else each on its own (min-max); the
    per-head maps are each on their own.

    Raises:
        ValueError: if ``block`` is out of range for the models.
    """
    depth = len(pair.original.blocks)
    if not -depth <= block < depth:
        raise ValueError(f"block {block} is out of range: the model has {depth} blocks (0..{depth - 1})")
    if sample.mask is not None:                        # rendered at the input size: its pixels as they are
        x, view = SyntheticShapes.normalise_image(sample.image)[None], sample.image
    else:
        x, view = preprocess(pair.original, [sample.image]), model_view(pair.original, sample.image)
    x, mask = x.to(pair.device), None if sample.mask is None else sample.mask[None]
    labels = model_labels(pair.original)
    att = {"original": cls_attention(pair.original, x, block), "compressed": cls_attention(pair.compressed, x, block)}
    # One colour scale for both head-mean maps (per-patch shares: a merged token's share is spread over its
    # patches), so a flatter map looks flatter; or each map stretched to its own range.
    vrange = shared_range(*(a.mean()[0] for a in att.values())) if shared_scale else None
    res = {}
    for which, a in att.items():
        heads = [(overlay(view, a.patch_maps[0, h]), f"head {h}") for h in range(a.patch_maps.shape[1])]
        inside = None if mask is None else float(attention_in_mask(a, mask.to(a.patch_maps.device))[0])
        top5 = top_k(a.logits[0], labels) if pair.original.num_classes else {}    # a feature backbone: no classes
        res[which] = (overlay(view, a.mean()[0], scale=True, vrange=vrange), heads, top5, a.grid, inside)
    o, c = res["original"], res["compressed"]
    return AttentionView(display_view(view), o[0], c[0], o[1], c[1], o[2], c[2], (o[3], c[3]),
                         None if mask is None else (o[4], c[4]),
                         None if mask is None else float(mask.float().mean()), sample.label,
                         classes_note(pair.original), vrange, att["original"].query)
