"""One-shot compression: ATME + CDCP structure with no training (an *untrained preview*).

CAIT's accuracy comes from fine-tuning (compactors trained with the group-lasso gradient). Without it, every
compactor is the identity and scores tie, so this preview scores channels by the norms of their weight rows
(:func:`cait.select.weight_scores`). Use it to see the compressed architecture, its FLOPs and its speed — not its
accuracy.
"""
from __future__ import annotations

import copy

import torch.nn as nn

from .compactor import add_compactors
from .flops import analytic_flops, describe
from .merge import LayoutLike, apply_atme, format_layout
from .models import architecture
from .plan import split_budget
from .prune import prune
from .select import select_channels, weight_scores


def compress(model: nn.Module, flops_reduction: float, layout: LayoutLike = None, atme_share: float = 0.8,
             min_channels: int = 1, round_to: int = 1) -> nn.Module:
    """Compress a DeiT to a total FLOPs reduction: ATME first, then CDCP pruning for the rest (SPEC §2 budget split).

    Args:
        model: an uncompressed timm DeiT; it is not modified (a copy is compressed).
        flops_reduction: total FLOPs reduction R in [0, 1), e.g. 0.55 for the paper's DeiT-S.
        layout: explicit ATME layout (``"h4,v7"`` or ``{4: "h", 7: "v"}``); default: planned for ``atme_share · R``.
        atme_share: share of R planned for ATME when ``layout`` is None.
        min_channels: channels kept at least per head and per FFN.
        round_to: kept widths in multiples of this (8 suits CPU vector units and GPU tensor cores); 1 = exact.

    Returns:
        A compact model (timm ``VisionTransformer`` with merged and pruned blocks) whose FLOPs are at most
        ``(1 − R)`` of the original's. ``model.cait_meta`` records the settings, with ``preview=True``.

    Raises:
        ValueError: if R is out of range, the layout does not fit or alone exceeds R, or R cannot be reached.
    """
    split = split_budget(model, flops_reduction, layout, atme_share)
    out = copy.deepcopy(model).eval()
    apply_atme(out, split.layout)
    add_compactors(out)                                   # identity: prune() folds them away unchanged
    mask = select_channels(weight_scores(out), describe(out), split.target_flops, min_channels, round_to)
    prune(out, mask)
    out.cait_meta = {
        "base_model": architecture(model),
        "flops_reduction": flops_reduction,
        "merge": format_layout(split.layout),
        "atme_reduction": round(split.atme_reduction, 6),
        "achieved_reduction": round(1.0 - analytic_flops(out) / split.base_flops, 6),
        "round_to": round_to,
        "preview": True,
        "note": "untrained preview: channels scored by weight-row norms, no CDCP fine-tuning",
    }
    return out
