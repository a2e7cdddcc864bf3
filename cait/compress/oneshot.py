"""One-shot compression: the ATME + CDCP structure for a FLOPs target, without fine-tuning (docs/method.md: budget
split).

CAIT's full accuracy comes from CDCP fine-tuning (:mod:`cait.finetune`). Without training there are two ways to pick
and fit the channels, both here:

* **calibrated** (``calibration=...``): a few hundred unlabelled images score every unit by its Fisher information
  (:func:`cait.compress.importance.fisher_scores`) and refit each block's output Linears by least squares to
  reproduce the original (:func:`cait.compress.refit.refit_`, after Kwon et al. 2022). Seconds to minutes on a CPU;
  the twin the app shows for a Hub DeiT.
* **preview** (no calibration): channels scored by the norms of their weight rows, nothing refit. Instant; shows the
  architecture, its FLOPs and its speed, not its accuracy.

The command line is ``python -m cait.compress`` (:mod:`cait.cli.compress`).
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn

from ..data.calibration import calibration_images
from ..models.atme import apply_atme
from ..models.deit import architecture
from ..models.layout import Layout, LayoutLike
from ..models.meta import CalibrationSummary, ModelMeta, meta_of
from ..models.spec import describe
from .importance import fisher_scores, per_flop, tensor_batches, weight_scores
from .plan import BudgetSplit, atme_reduction, split_budget
from .prune import prune
from .refit import refit_
from .select import select_channels


def compress(model: nn.Module, flops_reduction: float, layout: LayoutLike = None, atme_share: float = 0.8,
             min_channels: int = 1, round_to: int = 1, calibration=None, calibration_size: int = 256,
             batch_size: int = 32, seed: int = 0, progress=None) -> nn.Module:
    """Compress a DeiT to a total FLOPs reduction: ATME first, then CDCP pruning for the rest (docs/method.md: budget
    split).

    Args:
        model: an uncompressed timm DeiT; it is not modified (a copy is compressed).
        flops_reduction: total FLOPs reduction R in [0, 1), e.g. 0.55 for the paper's DeiT-S.
        layout: explicit ATME layout (``"h4,v7"`` or ``{4: "h", 7: "v"}``); default: planned for ``atme_share · R``.
        atme_share: share of R planned for ATME when ``layout`` is None.
        min_channels: channels kept at least per head and per FFN.
        round_to: kept widths in multiples of this (8 suits CPU vector units and GPU tensor cores); 1 = exact.
        calibration: None for the weight-norm preview; otherwise unlabelled images to calibrate on, anything
            :func:`cait.data.calibration.calibration_images` takes (``"default"``, ``"synthetic"``, a directory, a
            tensor ``(N, 3, S, S)``, a DataLoader).
        calibration_size: how many calibration images.
        batch_size: images per pass while calibrating.
        seed: of the calibration draw.
        progress: called with short status strings while calibrating (e.g. a tqdm bar's ``set_description``).

    Returns:
        A compact model (timm ``VisionTransformer`` with merged and pruned blocks) whose FLOPs are at most
        ``(1 − R)`` of the original's. ``model.cait_meta`` (:class:`cait.models.meta.ModelMeta`) records the settings:
        kind ``"preview"`` without calibration; ``"calibrated"`` with it, ``calibration``
        (:class:`cait.models.meta.CalibrationSummary`) giving the images, their source, the seconds it took and each
        block's refit error.

    Raises:
        ValueError: if R is out of range, the layout does not fit or alone exceeds R, or R cannot be reached.
        cait.data.datasets.DataError: for calibration data that cannot be used.
    """
    split = split_budget(model, flops_reduction, layout, atme_share)
    out = apply_atme(copy.deepcopy(model).eval(), split.layout)
    t0 = time.perf_counter()
    spec = describe(out)                                   # the merged model's shape, read once
    if calibration is None:
        mask = select_channels(weight_scores(out), spec, split.target_flops, min_channels, round_to)
        prune(out, mask)
        out.cait_meta = _meta(model, spec.with_widths(mask.widths()).flops(), split, round_to, None)
        out.cait_meta.planner = _planner(layout, atme_share)
        return out
    images = calibration_images(calibration, calibration_size, model, seed)
    fit, held_out = split_held_out(images)
    device = next(model.parameters()).device
    with torch.no_grad():                                  # the original's own predictions are the labels
        labels = torch.cat([model(x.to(device)).argmax(-1).cpu() for x in tensor_batches(fit, batch_size)])
    candidates = {"fisher": per_flop(fisher_scores(out, fit, labels, batch_size, progress), spec),
                  "weight": weight_scores(out)}
    masks = {k: select_channels(v, spec, split.target_flops, min_channels, round_to) for k, v in candidates.items()}
    channels, out = _better_channels(out, masks, model, held_out, batch_size)
    report = refit_(out, model, fit, batch_size, progress=progress, held_out=held_out)
    summary = _summary(calibration, images, report, t0, channels=channels)
    out.cait_meta = _meta(model, spec.with_widths(masks[channels].widths()).flops(), split, round_to, summary)
    out.cait_meta.planner = _planner(layout, atme_share)
    return out


def _planner(layout: LayoutLike, atme_share: float) -> dict:
    """How the layout was chosen: the paper's rule (ATME planned for ``atme_share`` of R) or given explicitly."""
    return {"planner": "paper", "atme_share": atme_share} if layout is None else {"planner": "explicit"}


HELD_OUT_SHARE = 0.25
"""Share of the calibration images kept out of the fit to judge it (channel scores, each block's refit); at least
8 images on each side, else nothing is held out and every refit is kept."""


def split_held_out(images: torch.Tensor, share: float = HELD_OUT_SHARE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(fit, held_out)``: the last ``share`` of ``images`` ``(n, 3, S, S)`` held out (None when either side would
    have fewer than 8 images).

    >>> fit, held = split_held_out(torch.zeros(256, 3, 8, 8))
    >>> len(fit), len(held)
    (192, 64)
    >>> split_held_out(torch.zeros(12, 3, 8, 8))[1] is None
    True
    """
    k = int(round(share * len(images)))
    if k < 8 or len(images) - k < 8:
        return images, None
    return images[:-k], images[-k:]


@torch.no_grad()
def log_probs(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """The model's log-probabilities ``(n, classes)`` (float32, on the CPU) for ``images`` ``(n, 3, S, S)``."""
    dev = next(model.parameters()).device
    return torch.cat([model(x.to(dev)).float().log_softmax(-1).cpu() for x in tensor_batches(images, batch_size)])


def held_out_kl(twin: nn.Module, original: nn.Module, images: torch.Tensor, batch_size: int = 32,
                ref: torch.Tensor | None = None) -> float:
    """Mean KL(original ‖ twin) of the output distributions over ``images`` ``(n, 3, S, S)``, in nats per image;
    ``ref``: the original's :func:`log_probs` on them, when already computed."""
    ref = log_probs(original, images, batch_size) if ref is None else ref
    out = log_probs(twin, images, batch_size)
    return float(torch.nn.functional.kl_div(out, ref, log_target=True, reduction="sum")) / max(len(images), 1)


def _better_channels(merged: nn.Module, masks: dict, original: nn.Module, held_out: torch.Tensor | None,
                     batch_size: int) -> tuple[str, nn.Module]:
    """Prune ``merged`` with each candidate mask and keep the one whose twin is closest to the original on the
    held-out images (Fisher when nothing is held out): so a calibrated twin starts no worse than the preview."""
    if held_out is None:
        prune(merged, masks["fisher"])
        return "fisher", merged
    best, ref = None, log_probs(original, held_out, batch_size)          # the original's outputs, once
    for name, mask in masks.items():
        twin = prune(copy.deepcopy(merged), mask)
        kl = held_out_kl(twin, original, held_out, batch_size, ref)
        if best is None or kl < best[0]:
            best = (kl, name, twin)
    return best[1], best[2]


def calibrate_merges(model: nn.Module, layout: LayoutLike, calibration, calibration_size: int = 256,
                     batch_size: int = 32, seed: int = 0, progress=None) -> nn.Module:
    """ATME alone, calibrated: ``layout`` applied to a copy of ``model`` and each block's merge fusion, ``proj`` and
    ``fc2`` refit to the original's tokens (:func:`cait.compress.refit.refit_`) on unlabelled images; every channel
    kept. The start of a fine-tune whose CDCP prunes during training (``python -m cait.finetune --calibrate N
    --calibrate-start merges``), where :func:`compress` would prune before it.

    Args:
        model: an uncompressed timm DeiT; it is not modified.
        layout: the ATME layout (``"h4,v9"`` or ``{4: "h", 9: "v"}``).
        calibration, calibration_size, batch_size, seed, progress: as for :func:`compress`.

    Returns:
        The ATME DeiT (merged, unpruned), its FLOPs those of the layout (:func:`cait.compress.plan.atme_reduction`).

    Raises:
        ValueError: if the layout does not fit the model.
        cait.data.datasets.DataError: for calibration data that cannot be used.
    """
    out = apply_atme(copy.deepcopy(model).eval(), layout)
    t0 = time.perf_counter()
    images = calibration_images(calibration, calibration_size, model, seed)
    fit, held_out = split_held_out(images)
    summary = _summary(calibration, images, refit_(out, model, fit, batch_size, progress=progress,
                                                   held_out=held_out), t0)
    reduction = round(atme_reduction(model, layout), 6)
    out.cait_meta = ModelMeta(kind="calibrated", base_model=architecture(model), flops_reduction=reduction,
                              merge=str(Layout.parse(layout)), atme_reduction=reduction, achieved_reduction=reduction,
                              classes=meta_of(model).classes, calibration=summary,
                              note=f"ATME refit on {len(images)} unlabelled images, every channel kept: a start for "
                                   f"CDCP fine-tuning")
    return out


def _summary(calibration, images: torch.Tensor, fit: dict, t0: float, channels: str = "") -> CalibrationSummary:
    """What a calibration used and reached: the images, their source, the seconds since ``t0``, each block's
    refit error, which refits were kept and the held-out KL (``fit``: :func:`cait.compress.refit.refit_`'s report),
    and which channel scores won (``channels``)."""
    kl = [fit.get("kl_start"), fit.get("kl_end")]
    return CalibrationSummary(
        images=len(images), source=calibration if isinstance(calibration, str) else type(calibration).__name__,
        seconds=round(time.perf_counter() - t0, 1), block_mse=[round(b["mse_after"], 6) for b in fit["blocks"]],
        channels=channels, refit_blocks=[b["block"] for b in fit["blocks"] if b.get("kept", True)],
        held_out_kl=[round(k, 5) for k in kl] if None not in kl else [])


def _meta(model: nn.Module, flops: int, split: BudgetSplit, round_to: int,
          calibration: CalibrationSummary | None) -> ModelMeta:
    """The record a one-shot twin of ``flops`` multiply-adds carries: kind ``"preview"`` or ``"calibrated"``, its
    layout and reductions."""
    meta = ModelMeta(kind="preview" if calibration is None else "calibrated", base_model=architecture(model),
                     flops_reduction=split.total_reduction, merge=str(split.layout),
                     atme_reduction=round(split.atme_reduction, 6),
                     achieved_reduction=round(1.0 - flops / split.base_flops, 6), round_to=round_to,
                     classes=meta_of(model).classes, calibration=calibration)
    meta.note = ("untrained preview: channels scored by weight-row norms, no CDCP fine-tuning" if calibration is None
                 else f"calibrated, training-free: Fisher channel scores and a least-squares refit on "
                      f"{calibration.images} unlabelled images, no CDCP fine-tuning")
    return meta
