"""``python -m cait.bench``: a DeiT against its CAIT twin, FLOPs, parameters and measured throughput.

::

    python -m cait.bench --model deit_small_patch16_224 --flops-reduction 0.55 --batch-size 32 --json
    python -m cait.bench --precision bf16 --json        # both in bf16, plus the fp32 original as the reference

prints one JSON object: ``original`` and ``compressed`` each with ``flops`` (multiply-adds per image, fvcore),
``params``, ``images_per_s`` and ``latency_s`` (seconds per batch), then ``speedup`` (the median of the per-round
ratios), ``speedup_range`` (its lowest and highest round), ``rounds`` and ``flops_ratio``. With
``--precision`` other than fp32 (:mod:`cait.measure.precision`) both run in it, and ``original_fp32`` is timed in
the same alternation; ``speedup_vs_fp32`` is the twin against it.
Weights are random unless ``--pretrained``: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..compress.oneshot import compress
from ..measure.flops import count_flops, count_params
from ..measure.precision import PRECISIONS, PrecisionError, check_precision, in_precision
from ..measure.speed import compare_throughput, resolve_device, speedup_spread
from ..io.source import create_model


def run(model_name: str, flops_reduction: float, merge: str | None = None, batch_size: int = 32,
        device: str | None = None, pretrained: bool = False, warmup: int = 2, iters: int = 5, rounds: int = 3,
        round_to: int = 1, precision: str = "fp32") -> dict:
    """Build a ViT (any :class:`cait.ModelSource` spelling: a timm name, ``hf-hub:``, a directory, ``bundled``) and
    its CAIT twin, count FLOPs and params, and measure both in ``precision``. Returns the
    JSON-ready dict.

    Raises:
        ValueError: a bad reduction or layout; :class:`cait.measure.precision.PrecisionError` (a ValueError) for a
            precision the device cannot run.
    """
    dev = resolve_device(device)
    check_precision(precision, dev)
    original, info = create_model(model_name, pretrained=pretrained)
    compressed = compress(original, flops_reduction, layout=merge, round_to=round_to)
    runs = {"original": in_precision(original, precision, dev), "compressed": in_precision(compressed, precision, dev)}
    if precision != "fp32":
        runs = {"original_fp32": original, **runs}
    size = int(original.patch_embed.img_size[0])
    speed = compare_throughput(runs, batch_size, device, warmup, iters, rounds, img_size=size)
    out: dict = {"model": model_name, "flops_reduction": flops_reduction, "merge": compressed.cait_meta.merge,
                 "round_to": round_to, "precision": precision,
                 "weights": info.source, "device": speed["original"]["device"], "batch_size": batch_size,
                 "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, m in (("original", original), ("compressed", compressed)):
        out[name] = {"flops": count_flops(m), "params": count_params(m), **speed[name]}
    up = speedup_spread(speed, "compressed")                      # round by round: median and range over rounds
    out["speedup"], out["speedup_range"], out["rounds"] = up.median, [up.low, up.high], up.n
    out["flops_ratio"] = out["original"]["flops"] / out["compressed"]["flops"]
    out["speedup_vs_flops_ideal"] = out["speedup"] / out["flops_ratio"]
    fp32 = speed.get("original_fp32", speed["original"])
    out["original_fp32"] = fp32
    out["speedup_vs_fp32"] = speedup_spread(speed, "compressed", "original_fp32" if precision != "fp32" else
                                            "original").median
    return out



def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring); exit 2 with a message on bad input."""
    p = argparse.ArgumentParser(prog="python -m cait.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224",
                   help="a timm ViT name, hf-hub:owner/name, a checkpoint directory or 'bundled'")
    p.add_argument("--flops-reduction", type=float, default=0.55, help="total FLOPs reduction R in [0, 1)")
    p.add_argument("--merge", default=None, help="explicit ATME layout, e.g. h4,v7 (default: planned)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--pretrained", action="store_true", help="use timm weights (speed does not depend on them)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per model")
    p.add_argument("--iters", type=int, default=5, help="timed batches per model per round")
    p.add_argument("--rounds", type=int, default=3, help="alternation rounds")
    p.add_argument("--round-to", type=int, default=1, help="kept widths in multiples of this (e.g. 8)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="what both models compute in")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args(argv)
    try:
        out = run(a.model, a.flops_reduction, a.merge, a.batch_size, a.device, a.pretrained, a.warmup, a.iters,
                  a.rounds, a.round_to, a.precision)
    except (ValueError, PrecisionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{a.model} on {out['device']}, batch {a.batch_size}, merge {out['merge'] or '-'}")
        for k in ("original", "compressed"):
            r = out[k]
            print(f"  {k:<10} {r['flops'] / 1e9:7.3f} GFLOPs  {r['params'] / 1e6:6.2f} M params  "
                  f"{r['images_per_s']:9.1f} images/s")
        print(f"  speed-up {out['speedup']:.2f}x ({out['speedup_range'][0]:.2f}-{out['speedup_range'][1]:.2f} over "
              f"{out['rounds']} rounds) for a FLOPs ratio of {out['flops_ratio']:.2f}x"
              + (f"; {out['speedup_vs_fp32']:.2f}x the fp32 original" if a.precision != "fp32" else ""))
    return 0
