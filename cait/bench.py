"""Throughput: images/s of a model, and ``python -m cait.bench`` comparing a DeiT with its CAIT twin.

Convention (paper §IV, SPEC §4): one device, a fixed batch, images per second; speed-ups are ratios against the
uncompressed model measured the same way in the same run. Models are timed in alternation (original, compressed,
original, …) so drift in clock speed or load hits both alike; the reported figure is the median.

Command line::

    python -m cait.bench --model deit_small_patch16_224 --flops-reduction 0.55 --batch-size 32 --json

prints one JSON object: ``original`` and ``compressed`` each with ``flops`` (multiply-adds per image, fvcore),
``params``, ``images_per_s`` and ``latency_s`` (seconds per batch), then ``speedup`` and ``flops_ratio``.
Weights are random unless ``--pretrained``: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn


def resolve_device(device: str | None = None) -> torch.device:
    """``"cuda"``/``"cpu"``/None (CUDA when available) → a ``torch.device``.

    Raises:
        ValueError: if CUDA is asked for but not available.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for, but torch sees no GPU here; use --device cpu")
    return dev


def _time_batches(model: nn.Module, x: torch.Tensor, iters: int, amp_dtype: torch.dtype | None) -> list[float]:
    """Seconds per batch for ``iters`` batches (CUDA events on GPU, wall clock on CPU)."""
    cuda = x.device.type == "cuda"
    out = []
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for _ in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(x)
                end.record()
                torch.cuda.synchronize()
                out.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                model(x)
                out.append(time.perf_counter() - t0)
    return out


def compare_throughput(models: dict[str, nn.Module], batch_size: int = 32, device: str | torch.device | None = None,
                       warmup: int = 2, iters: int = 5, rounds: int = 3, img_size: int | None = None,
                       amp_dtype: torch.dtype | None = None, progress=None) -> dict[str, dict]:
    """Measure several models in alternation on the same input.

    Args:
        models: name → model (moved to ``device``, put in eval mode).
        batch_size: images per batch.
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
        warmup: untimed batches per model before timing.
        iters: timed batches per model per round.
        rounds: alternation rounds.
        img_size: input side in pixels; default: the first model's.
        amp_dtype: e.g. ``torch.bfloat16`` for autocast; None for the model's own dtype.
        progress: called as ``progress(fraction_done, message)`` after every warm-up and timed run (a UI bar).

    Returns:
        name → ``{"images_per_s", "latency_s" (median seconds per batch), "batch_size", "device"}``.
    """
    dev = resolve_device(device if device is None else str(device))
    size = img_size or next(iter(models.values())).patch_embed.img_size[0]
    x = torch.randn(batch_size, 3, size, size, device=dev)
    total, done = len(models) * (1 + rounds), 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done / total, what)

    for name, m in models.items():
        m.to(dev).eval()
        _time_batches(m, x, warmup, amp_dtype)
        tick(f"warm-up: {name}")
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(rounds):
        for name, m in models.items():
            times[name] += _time_batches(m, x, iters, amp_dtype)
            tick(f"round {r + 1}/{rounds}: {name}")
    result = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"images_per_s": batch_size / med, "latency_s": med, "batch_size": batch_size,
                        "device": str(dev)}
    return result


def measure_throughput(model: nn.Module, batch_size: int = 32, device: str | torch.device | None = None,
                       warmup: int = 2, iters: int = 10, img_size: int | None = None,
                       amp_dtype: torch.dtype | None = None) -> dict:
    """Images/s of one model: ``{"images_per_s", "latency_s", "batch_size", "device"}`` (see compare_throughput)."""
    return compare_throughput({"model": model}, batch_size, device, warmup, iters, 1, img_size, amp_dtype)["model"]


def run(model_name: str, flops_reduction: float, merge: str | None = None, batch_size: int = 32,
        device: str | None = None, pretrained: bool = False, warmup: int = 2, iters: int = 5, rounds: int = 3,
        round_to: int = 1) -> dict:
    """Build a DeiT and its CAIT twin, count FLOPs and params, and measure both. Returns the JSON-ready dict."""
    from .compress import compress
    from .flops import count_flops, count_params
    from .models import create_model

    original, info = create_model(model_name, pretrained=pretrained)
    compressed = compress(original, flops_reduction, layout=merge, round_to=round_to)
    speed = compare_throughput({"original": original, "compressed": compressed}, batch_size, device, warmup, iters,
                               rounds)
    out: dict = {"model": model_name, "flops_reduction": flops_reduction, "merge": compressed.cait_meta.merge,
                 "round_to": round_to,
                 "weights": info.source, "device": speed["original"]["device"], "batch_size": batch_size,
                 "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, m in (("original", original), ("compressed", compressed)):
        out[name] = {"flops": count_flops(m), "params": count_params(m), **speed[name]}
    out["speedup"] = out["compressed"]["images_per_s"] / out["original"]["images_per_s"]
    out["flops_ratio"] = out["original"]["flops"] / out["compressed"]["flops"]
    out["speedup_vs_flops_ideal"] = out["speedup"] / out["flops_ratio"]
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring); exit 2 with a message on bad input."""
    p = argparse.ArgumentParser(prog="python -m cait.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224", help="timm DeiT name")
    p.add_argument("--flops-reduction", type=float, default=0.55, help="total FLOPs reduction R in [0, 1)")
    p.add_argument("--merge", default=None, help="explicit ATME layout, e.g. h4,v7 (default: planned)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--pretrained", action="store_true", help="use timm weights (speed does not depend on them)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per model")
    p.add_argument("--iters", type=int, default=5, help="timed batches per model per round")
    p.add_argument("--rounds", type=int, default=3, help="alternation rounds")
    p.add_argument("--round-to", type=int, default=1, help="kept widths in multiples of this (e.g. 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args(argv)
    try:
        out = run(a.model, a.flops_reduction, a.merge, a.batch_size, a.device, a.pretrained, a.warmup, a.iters,
                  a.rounds, a.round_to)
    except ValueError as e:
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
        print(f"  speed-up {out['speedup']:.2f}x for a FLOPs ratio of {out['flops_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
