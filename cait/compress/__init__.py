"""Training-free compression: ATME + CDCP structure for a FLOPs target, calibrated or as a weight-norm preview.

CAIT's full accuracy comes from CDCP fine-tuning (:mod:`cait.finetune`). Without training there are two ways to pick
and fit the channels, both here:

* **calibrated** (``calibration=...``): a few hundred unlabelled images score every unit by its Fisher information
  and refit each block's output Linears by least squares to reproduce the original (:mod:`cait.calibrate`, after
  Kwon et al. 2022). Seconds to minutes on a CPU; the twin the app shows for a Hub DeiT.
* **preview** (no calibration): channels scored by the norms of their weight rows, nothing refit. Instant; shows the
  architecture, its FLOPs and its speed, not its accuracy.

Command line (writes a checkpoint that :func:`cait.load_pretrained` and the app load)::

    python -m cait.compress --model deit_small_patch16_224 --flops-reduction 0.55 --calibration default \\
        --calibration-size 256 --output runs/deit_s_cait_calibrated
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
import torch.nn as nn

from ..flops import analytic_flops, describe
from ..merge import LayoutLike, apply_atme, format_layout
from ..meta import ModelMeta, meta_of
from ..models import architecture
from ..plan import split_budget
from ..prune import prune
from ..select import select_channels, weight_scores


def compress(model: nn.Module, flops_reduction: float, layout: LayoutLike = None, atme_share: float = 0.8,
             min_channels: int = 1, round_to: int = 1, calibration=None, calibration_size: int = 256,
             batch_size: int = 32, seed: int = 0, progress=None) -> nn.Module:
    """Compress a DeiT to a total FLOPs reduction: ATME first, then CDCP pruning for the rest (SPEC §2 budget split).

    Args:
        model: an uncompressed timm DeiT; it is not modified (a copy is compressed).
        flops_reduction: total FLOPs reduction R in [0, 1), e.g. 0.55 for the paper's DeiT-S.
        layout: explicit ATME layout (``"h4,v7"`` or ``{4: "h", 7: "v"}``); default: planned for ``atme_share · R``.
        atme_share: share of R planned for ATME when ``layout`` is None.
        min_channels: channels kept at least per head and per FFN.
        round_to: kept widths in multiples of this (8 suits CPU vector units and GPU tensor cores); 1 = exact.
        calibration: None for the weight-norm preview; otherwise unlabelled images to calibrate on, anything
            :func:`cait.data.calibration_images` takes (``"default"``, ``"synthetic"``, a directory, a tensor
            ``(N, 3, S, S)``, a DataLoader).
        calibration_size: how many calibration images.
        batch_size: images per pass while calibrating.
        seed: of the calibration draw.
        progress: called with short status strings while calibrating (e.g. a tqdm bar's ``set_description``).

    Returns:
        A compact model (timm ``VisionTransformer`` with merged and pruned blocks) whose FLOPs are at most
        ``(1 − R)`` of the original's. ``model.cait_meta`` (:class:`cait.meta.ModelMeta`) records the settings:
        kind ``"preview"`` without calibration; ``"calibrated"`` with it, ``calibration`` giving the images, their
        source and the seconds it took.

    Raises:
        ValueError: if R is out of range, the layout does not fit or alone exceeds R, or R cannot be reached.
        cait.data.DataError: for calibration data that cannot be used.
    """
    split = split_budget(model, flops_reduction, layout, atme_share)
    out = copy.deepcopy(model).eval()
    apply_atme(out, split.layout)
    t0 = time.perf_counter()
    if calibration is None:
        scores = weight_scores(out)
    else:
        from ..calibrate import fisher_scores, per_flop
        from ..data import calibration_images
        images = calibration_images(calibration, calibration_size, model, seed)
        device = next(model.parameters()).device
        with torch.no_grad():
            labels = torch.cat([model(images[i:i + batch_size].to(device)).argmax(-1).cpu()
                                for i in range(0, len(images), batch_size)])
        scores = per_flop(fisher_scores(out, images, labels, batch_size, progress), describe(out))
    mask = select_channels(scores, describe(out), split.target_flops, min_channels, round_to)
    prune(out, mask)
    meta = ModelMeta(kind="preview" if calibration is None else "calibrated", base_model=architecture(model),
                     flops_reduction=flops_reduction, merge=format_layout(split.layout),
                     atme_reduction=round(split.atme_reduction, 6),
                     achieved_reduction=round(1.0 - analytic_flops(out) / split.base_flops, 6), round_to=round_to,
                     classes=meta_of(model).classes)
    if calibration is None:
        meta.note = "untrained preview: channels scored by weight-row norms, no CDCP fine-tuning"
    else:
        from ..calibrate import refit_
        fit = refit_(out, model, images, batch_size, progress=progress)
        source = calibration if isinstance(calibration, str) else type(calibration).__name__
        meta.calibration = {"images": len(images), "source": source, "seconds": round(time.perf_counter() - t0, 1),
                            "block_mse": [round(b["mse_after"], 6) for b in fit["blocks"]]}
        meta.note = (f"calibrated, training-free: Fisher channel scores and a least-squares refit on {len(images)} "
                     "unlabelled images, no CDCP fine-tuning")
    out.cait_meta = meta
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m cait.compress``: compress, report, save. Exit 2 with an ``error:`` line on bad input."""
    from ..checkpoint import CheckpointError, load_pretrained, save_pretrained
    from ..data import CALIBRATION_SOURCES, DataError
    from ..flops import count_flops, count_params
    from ..models import create_model

    p = argparse.ArgumentParser(prog="python -m cait.compress", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="timm DeiT name (timm weights when the Hub is reachable) or a "
                                                  "checkpoint directory of an uncompressed model")
    p.add_argument("--flops-reduction", type=float, required=True, help="total FLOPs reduction R in [0, 1)")
    p.add_argument("--merge", default=None, help="explicit ATME layout, e.g. h4,v7 (default: planned)")
    p.add_argument("--round-to", type=int, default=1, help="kept widths in multiples of this")
    p.add_argument("--calibration", default="default",
                   help="'none' (weight-norm preview), " + ", ".join(f"'{k}'" for k in CALIBRATION_SOURCES)
                        + ", or a directory of images")
    p.add_argument("--calibration-size", type=int, default=256, help="calibration images")
    p.add_argument("--batch-size", type=int, default=32, help="images per calibration pass")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    a = p.parse_args(argv)
    try:
        if torch.cuda.is_available() is False and a.device == "cuda":
            raise ValueError("CUDA was asked for, but torch sees no GPU here; use --device cpu")
        from pathlib import Path
        if Path(a.model).is_dir():
            model = load_pretrained(a.model, a.device)
            source = f"checkpoint {a.model}"
        else:
            model, info = create_model(a.model, pretrained=True)
            model = model.to(a.device)
            source = info.detail
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(desc="cait.compress", bar_format="{desc} [{elapsed}]")
        t0 = time.perf_counter()
        out = compress(model, a.flops_reduction, a.merge, round_to=a.round_to,
                       calibration=None if a.calibration == "none" else a.calibration,
                       calibration_size=a.calibration_size, batch_size=a.batch_size,
                       progress=(bar.set_description if bar else None))
        if bar:
            bar.close()
        seconds = time.perf_counter() - t0
        try:
            dest = save_pretrained(out, a.output)
        except OSError as e:
            raise ValueError(f"--output {a.output}: cannot write there ({e.strerror or e})") from None
    except (ValueError, DataError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"model": a.model, "weights": source, "output": str(dest), "merge": out.cait_meta.merge,
                      "flops": count_flops(out), "base_flops": count_flops(model), "params": count_params(out),
                      "seconds": round(seconds, 1), "calibration": out.cait_meta.calibration}))
    return 0

