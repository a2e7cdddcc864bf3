"""The backbones a segmenter can read, by name: a checkpoint (the original or its CAIT twin), or a training-free
baseline made from an uncompressed one at a FLOPs reduction (paper §IV-B1, Tab. XVI)::

    none            the checkpoint as it is (the bundled original, the bundled twin, any DeiT of this package)
    tome            ToMe at the reduction, merges undone for dense outputs          (cait.baselines.tome)
    token_pruning   EViT-style pruning at the reduction, drops filled in            (cait.baselines.token_pruning)
    atme            ATME alone: the layout's merges, calibrated without training     (cait.compress)
    cdcp            CDCP alone at the reduction, calibrated without training        (cait.compress, layout "")

``bundled:original`` and ``bundled:cait`` name the pair in ``assets/``.
"""
from __future__ import annotations

import copy

import torch.nn as nn

from ..baselines.token_pruning import apply_token_pruning, token_pruning_schedule
from ..baselines.tome import apply_tome, tome_schedule
from ..compress.oneshot import compress
from ..compress.plan import atme_reduction
from ..compress.prune import is_pruned
from ..io.bundled import bundled_pair
from ..io.checkpoint import load_checkpoint
from ..io.source import create_model as create_source_model
from ..models.atme import get_layout
from ..models.layout import Layout

BASELINES = ("none", "tome", "token_pruning", "atme", "cdcp")


def load_backbone(name: str) -> nn.Module:
    """``bundled:original``, ``bundled:cait``, or any :class:`cait.io.source.ModelSource` spelling: a timm name
    (timm weights when the Hub is reachable), ``hf-hub:owner/name``, a checkpoint directory.

    Raises:
        ValueError: for a name that is none of these, or a bundled pair that is not in this checkout.
        cait.io.checkpoint.CheckpointError: for a checkpoint that cannot be loaded.
    """
    if name.startswith("bundled:"):
        pair = bundled_pair()
        which = name.split(":", 1)[1]
        if pair is None or which not in ("original", "cait"):
            raise ValueError(f"{name!r}: the bundled pair is 'bundled:original' or 'bundled:cait'"
                             + ("" if pair is not None else ", and it is not in this checkout (assets/)"))
        return load_checkpoint(pair.original_dir if which == "original" else pair.twin_dir)
    return create_source_model(name)[0]                 # a timm name, hf-hub:owner/name, a checkpoint directory


def make_backbone(model: nn.Module, baseline: str, flops_reduction: float, merge: str | None = None,
                  calibration_size: int = 256) -> tuple[nn.Module, str]:
    """The backbone a segmenter reads, and one sentence saying what it is.

    Args:
        model: an uncompressed DeiT for every baseline but ``"none"``.
        baseline: one of :data:`BASELINES`.
        flops_reduction: for ``tome``, ``token_pruning`` and ``cdcp``: the share of FLOPs removed.
        merge: for ``atme``: its layout (required).
        calibration_size: synthetic images ``atme`` and ``cdcp`` are calibrated on.

    Raises:
        ValueError: an unknown baseline, a baseline of a compressed model, or an ``atme`` without a layout.
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if baseline == "none":
        return model, ("CAIT twin" if get_layout(model) and is_pruned(model) else "ATME" if get_layout(model) else
                       "CDCP-pruned" if is_pruned(model) else "uncompressed") + " backbone"
    if get_layout(model) or is_pruned(model):
        raise ValueError(f"the {baseline} baseline is made from an uncompressed backbone; this one is compressed")
    model = copy.deepcopy(model).eval()
    if baseline == "tome":
        return apply_tome(model, tome_schedule(model, flops_reduction)), f"ToMe at {100 * flops_reduction:.0f}% " \
            "fewer FLOPs, merges undone"
    if baseline == "token_pruning":
        rate = token_pruning_schedule(model, flops_reduction)
        return apply_token_pruning(model, rate), f"EViT token pruning, keep rate {rate:.3f}, drops filled in"
    if baseline == "atme":
        if not merge:
            raise ValueError("the atme baseline needs a layout (--merge), e.g. the twin's")
        layout = Layout.parse(merge)
        return (compress(model, atme_reduction(model, layout), layout=layout, calibration="synthetic",
                         calibration_size=calibration_size), f"ATME {layout} alone, calibrated without training")
    return (compress(model, flops_reduction, layout="", calibration="synthetic", calibration_size=calibration_size),
            f"CDCP alone at {100 * flops_reduction:.0f}% fewer FLOPs, calibrated without training")
