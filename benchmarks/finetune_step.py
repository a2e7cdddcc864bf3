"""Training-step time: CDCP fine-tuning (ATME + compactors + Eq. 2 rule) against plain fine-tuning of the same model.

    python benchmarks/finetune_step.py --model deit_tiny_patch16_224 --batch-size 32 --device cpu

Prints one JSON object: seconds per step (median) for ``plain`` (the timm model, AdamW) and ``cdcp`` (the student of
``cait.finetune``: merges, compactors, the gradient rule, a masked set at the final target), and their ratio.
Teacher forward and data loading are left out of both: they are the same for both and not what compactors cost.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cait  # noqa: E402
from cait.finetune.lasso import apply_gradient_rule  # noqa: E402


def step_times(model, x, y, rule=None, steps=5, warmup=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if rule:
            rule()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--flops-reduction", type=float, default=0.5)
    p.add_argument("--merge", default=None, help="ATME layout of the student ('' for none: compactors alone)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    dev = torch.device(a.device)
    plain, _ = cait.create_model(a.model, pretrained=False)
    split = cait.split_budget(plain, a.flops_reduction, layout=a.merge)
    student = cait.add_compactors(cait.apply_atme(copy.deepcopy(plain), split.layout))
    mask = cait.select_channels(cait.compactor_scores(student), cait.describe(student), split.target_flops)
    plain.to(dev).train()
    student.to(dev).train()
    size = plain.patch_embed.img_size[0]
    x = torch.randn(a.batch_size, 3, size, size, device=dev)
    y = torch.randint(0, plain.num_classes, (a.batch_size,), device=dev)
    t_plain = step_times(plain, x, y, steps=a.steps)
    t_cdcp = step_times(student, x, y, rule=lambda: apply_gradient_rule(student, mask), steps=a.steps)
    print(json.dumps({"model": a.model, "batch_size": a.batch_size, "device": str(dev), "merge": cait.format_layout(
        split.layout), "plain_s_per_step": t_plain, "cdcp_s_per_step": t_cdcp, "ratio": t_cdcp / t_plain,
        "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
