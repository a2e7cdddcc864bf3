"""Measure the speed levers one at a time on a CAIT model (issue "Speed"): fused attention kernel on pruned heads
(q/k width != v width), kept widths rounded to multiples of 8, and torch.compile.

    python benchmarks/levers.py --model deit_small_patch16_224 --flops-reduction 0.55 --batch-size 32 --device cpu

Prints one JSON object: images/s of each variant and its speed-up over the original, all timed in alternation.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cait  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--flops-reduction", type=float, default=0.55)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd original and CAIT")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    original, _ = cait.create_model(a.model, pretrained=False)
    exact = cait.compress(original, a.flops_reduction)
    rounded = cait.compress(original, a.flops_reduction, round_to=8)
    manual = copy.deepcopy(rounded)
    for b in manual.blocks:
        b.attn.fused_attn = False
    models = {"original": original, "cait_exact_widths": exact, "cait_round8": rounded,
              "cait_round8_manual_attention": manual}
    if a.compile:
        models["original_compiled"] = torch.compile(copy.deepcopy(original))
        models["cait_round8_compiled"] = torch.compile(copy.deepcopy(rounded))
    speed = cait.compare_throughput(models, a.batch_size, a.device, warmup=2, iters=3, rounds=a.rounds,
                                    amp_dtype=torch.bfloat16 if a.bf16 else None)
    base = speed["original"]["images_per_s"]
    print(json.dumps({"model": a.model, "batch_size": a.batch_size, "device": speed["original"]["device"],
                      "flops": {k: cait.analytic_flops(m) for k, m in models.items() if "compiled" not in k},
                      "images_per_s": {k: round(v["images_per_s"], 2) for k, v in speed.items()},
                      "speedup": {k: round(v["images_per_s"] / base, 3) for k, v in speed.items()},
                      "speedup_range": {k: [round(s.low, 3), round(s.high, 3)] for k, s in
                                        ((k, cait.measure.speed.speedup_spread(speed, k)) for k in speed)},
                      "rounds": a.rounds}, indent=2))


if __name__ == "__main__":
    main()
