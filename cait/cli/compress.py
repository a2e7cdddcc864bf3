"""``python -m cait.compress``: compress a DeiT without training, report its cost, save a loadable checkpoint.

::

    python -m cait.compress --model deit_small_patch16_224 --flops-reduction 0.55 --calibration default \\
        --calibration-size 256 --output runs/deit_s_cait_calibrated

    python -m cait.compress --model deit_tiny_patch16_224 --flops-reduction 0.5 --plan measured \\
        --output runs/deit_t_cait_measured

prints one JSON object (model, weights, output, merge, flops, base_flops, params, seconds, calibration, planner:
the measured planner's candidates, frontier, choice and costs with ``--plan measured``); the output
loads with :func:`cait.load_pretrained` and in the app. Bad input exits 2 with one ``error:`` line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
from tqdm import tqdm

from ..compress.oneshot import compress
from ..data.calibration import CALIBRATION_SOURCES
from ..data.datasets import DataError
from ..io.checkpoint import CheckpointError, save_pretrained
from ..measure.flops import count_flops, count_params
from ..measure.frontier import search_layouts
from ..io.source import create_model


def main(argv: list[str] | None = None) -> int:
    """``python -m cait.compress``: compress, report, save. Exit 2 with an ``error:`` line on bad input."""
    p = argparse.ArgumentParser(prog="python -m cait.compress", description=__doc__.split("\n\n")[0].strip("`"),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a timm ViT name (timm's weights when the Hub is reachable), "
                                                  "hf-hub:owner/name[@revision], a checkpoint directory of an "
                                                  "uncompressed model, or 'bundled'")
    p.add_argument("--flops-reduction", type=float, required=True, help="total FLOPs reduction R in [0, 1)")
    p.add_argument("--merge", default=None, help="explicit ATME layout, e.g. h4,v7, or 'none' (CDCP only); "
                                                 "default: planned by --plan")
    p.add_argument("--plan", default="paper", choices=["paper", "measured"],
                   help="how the layout is chosen when --merge is not given: 'paper' (ATME planned for 80%% of R, "
                        "paper IV-C1) or 'measured' (cait.measure.frontier.search_layouts: the split that keeps the "
                        "most agreement at >= 90%% of ToMe's measured speed; prints the candidates it measured)")
    p.add_argument("--max-merges", type=int, default=2, help="with --plan measured: merges per layout, 0..4")
    p.add_argument("--round-to", type=int, default=None,
                   help="kept widths in multiples of this (default: 1 for --plan paper, 8 for measured)")
    p.add_argument("--calibration", default="default",
                   help="'none' (weight-norm preview), " + ", ".join(f"'{k}'" for k in CALIBRATION_SOURCES)
                        + ", a directory of images, or a Hugging Face dataset hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--calibration-size", type=int, default=256, help="calibration images")
    p.add_argument("--batch-size", type=int, default=32, help="images per calibration pass")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    a = p.parse_args(argv)
    try:
        if torch.cuda.is_available() is False and a.device == "cuda":
            raise ValueError("CUDA was asked for, but torch sees no GPU here; use --device cpu")
        model, info = create_model(a.model, pretrained=True)
        model, source = model.to(a.device), info.detail
        bar = None
        if sys.stderr.isatty():
            bar = tqdm(desc="cait.compress", bar_format="{desc} [{elapsed}]")
        t0 = time.perf_counter()
        out, search = _compress(model, a, bar.set_description if bar else None)
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
                      "seconds": round(seconds, 1),
                      "calibration": (dataclasses.asdict(out.cait_meta.calibration)
                                      if out.cait_meta.calibration else None),
                      "planner": search.to_dict() if search else out.cait_meta.planner}))
    return 0


def _compress(model, a: argparse.Namespace, progress) -> tuple[torch.nn.Module, object]:
    """The twin the arguments ask for, and the measured planner's search (None with ``--plan paper`` or
    ``--merge``)."""
    if a.plan == "measured" and a.merge is None:
        if a.calibration == "none":
            raise ValueError("--plan measured scores calibrated twins; give --calibration a source, not 'none'")
        search = search_layouts(model, a.flops_reduction, calibration=a.calibration,
                                calibration_size=a.calibration_size, max_merges=a.max_merges,
                                round_to=8 if a.round_to is None else a.round_to, device=a.device,
                                batch_size=a.batch_size, progress=progress)
        return search.twin, search
    return compress(model, a.flops_reduction, a.merge, round_to=a.round_to or 1,
                    calibration=None if a.calibration == "none" else a.calibration,
                    calibration_size=a.calibration_size, batch_size=a.batch_size, progress=progress), None
