"""Training-free compression on a trained model: calibrated CAIT against the ToMe baseline at equal FLOPs.

    python benchmarks/training_free.py                          # the bundled DeiT-Tiny (assets/), 50% FLOPs
    python benchmarks/training_free.py --model runs/teacher/compact --flops-reduction 0.5 --val-size 1000

For a model trained on the synthetic shapes (the bundled original, or a checkpoint of ``cait.finetune``), builds:

* ``cait_calibrated[<layout>]``: ``cait.compress(..., calibration=...)`` for each layout asked for (``planned``: the
  paper's budget split; ``measured``: the measured planner's choice, its search in ``planner``; ``none``: CDCP only;
  or an explicit one such as ``h8,v10``);
* ``cait_preview``: the weight-norm preview (planned layout);
* ``tome``: ToMe (cait.baselines.tome) scheduled to the calibrated twin's FLOPs;
* ``cait_finetuned``: the bundled CAIT twin, when the model is the bundled original;

and measures each on the same held-out images (top-1 %, agreement with the original's predictions %, top-1 per class
and the three most frequent confusions as ``"true->predicted": images``) and on the CPU in one alternating run
(images/s at the batch size; the speed-up is the median over ``--rounds`` rounds, each timing every model once, with
its range). Prints one JSON object, with the calibration cost in seconds.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cait  # noqa: E402
from cait.baselines.tome import apply_tome, tome_flops, tome_schedule  # noqa: E402
from cait.measure.frontier import search_layouts  # noqa: E402
from cait.measure.speed import compare_throughput, speedup_spread, spread  # noqa: E402
from cait.io.bundled import bundled_pair  # noqa: E402
from cait.data.synthetic import CLASSES, SyntheticShapes  # noqa: E402


def per_class(pred: torch.Tensor, y: torch.Tensor, most: int = 3) -> dict:
    """Top-1 % per synthetic class (None for a class with no images) and the ``most`` most frequent confusions,
    from predictions and labels ``(N,)``."""
    C = len(CLASSES)
    cm = torch.bincount(y * C + pred, minlength=C * C).view(C, C)            # rows: true class, columns: predicted
    off = cm.clone().fill_diagonal_(0).flatten()
    counts, where = off.topk(most)
    return {"top1_per_class": {c: round(100 * float(cm[i, i] / cm[i].sum()), 1) if cm[i].sum() else None
                               for i, c in enumerate(CLASSES)},
            "confusions": {f"{CLASSES[int(w) // C]}->{CLASSES[int(w) % C]}": int(n)
                           for n, w in zip(counts, where) if n > 0}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="bundled", help="'bundled' or a checkpoint directory of an uncompressed model")
    p.add_argument("--flops-reduction", type=float, default=0.5)
    p.add_argument("--layouts", nargs="+", default=["planned", "none"],
                   help="one argument per layout: planned (the paper's budget split), measured (the measured "
                        "planner's choice, cait.measure.frontier), none (CDCP only) or an explicit layout such as "
                        "h5,v10")
    p.add_argument("--max-merges", type=int, default=2, help="merges per layout the measured planner tries")
    p.add_argument("--calibration", default="synthetic",
                   help="calibration source (see cait.data.calibration.calibration_images)")
    p.add_argument("--calibration-size", type=int, default=256)
    p.add_argument("--val-size", type=int, default=1000, help="held-out synthetic images")
    p.add_argument("--batch-size", type=int, default=32, help="batch for the speed measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-to", type=int, default=1)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    twin = None
    if a.model == "bundled":
        pair = bundled_pair()
        if pair is None:
            raise SystemExit("error: assets/ holds no bundled pair")
        original, twin = pair.load()
    else:
        original = cait.load_pretrained(a.model)
    r = a.flops_reduction
    models: dict[str, torch.nn.Module] = {"original": original}
    seconds = {}
    search = None
    for lay in a.layouts:
        t0 = time.perf_counter()
        if lay == "measured":
            search = search_layouts(original, r, calibration=a.calibration, calibration_size=a.calibration_size,
                                    max_merges=a.max_merges, round_to=8 if a.round_to == 1 else a.round_to)
            models[f"cait_calibrated[{lay}]"] = search.twin
        else:
            models[f"cait_calibrated[{lay}]"] = cait.compress(original, r, layout=None if lay == "planned" else lay,
                                                              round_to=a.round_to, calibration=a.calibration,
                                                              calibration_size=a.calibration_size)
        seconds[lay] = round(time.perf_counter() - t0, 1)
    models["cait_preview"] = cait.compress(original, r, round_to=a.round_to)
    first = next(k for k in models if k.startswith("cait_calibrated"))
    achieved = 1 - cait.analytic_flops(models[first]) / cait.analytic_flops(original)
    models["tome"] = apply_tome(copy.deepcopy(original), tome_schedule(original, achieved))
    if twin is not None:
        models["cait_finetuned"] = twin

    size = int(original.patch_embed.img_size[0])
    val = SyntheticShapes(a.val_size, size, 0, "val")
    x = torch.stack([val[i][0] for i in range(a.val_size)])
    y = torch.tensor([val[i][1] for i in range(a.val_size)])
    preds = {}
    with torch.no_grad():
        for k, m in models.items():
            preds[k] = torch.cat([m.eval()(x[i:i + 100]).argmax(-1) for i in range(0, a.val_size, 100)])
    timed = compare_throughput(models, batch_size=a.batch_size, device="cpu", warmup=1, iters=3, rounds=a.rounds)
    speed = {k: {"images_per_s": spread(timed[k]["round_images_per_s"]).median,
                 "speedup": speedup_spread(timed, k)} for k in models}
    base_flops = cait.analytic_flops(original)
    out = {"model": a.model, "flops_reduction": r, "val_size": a.val_size, "batch_size": a.batch_size,
           "calibration": {"source": a.calibration, "images": a.calibration_size, "seconds": seconds},
           "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or
           platform.machine(), "planner": search.to_dict() if search else None, "variants": {}}
    for k, m in models.items():
        flops = tome_flops(m) if k == "tome" else cait.analytic_flops(m)
        out["variants"][k] = {
            "merge": cait.format_layout(cait.get_layout(m)), "flops": flops,
            "flops_reduction": round(1 - flops / base_flops, 4), "params": cait.count_params(m),
            "top1": round(100 * float((preds[k] == y).float().mean()), 2),
            "agreement": round(100 * float((preds[k] == preds["original"]).float().mean()), 2),
            "images_per_s": round(speed[k]["images_per_s"], 2),
            "speedup": round(speed[k]["speedup"].median, 3),
            "speedup_range": [round(speed[k]["speedup"].low, 3), round(speed[k]["speedup"].high, 3)],
            **per_class(preds[k], y)}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
