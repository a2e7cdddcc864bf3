"""Dense transfer, measured: one segmenter per backbone, same decoder, steps and seed, scored and timed in one run.

    python benchmarks/dense.py --model bundled --val-size 1000 --img-size 224,448 --out runs/dense

Backbones (paper §IV-B1, Tab. XVI): ``original`` (the bundled DeiT-Tiny), ``cait`` (its CAIT twin), ``atme`` (the
twin's layout alone, calibrated without training), ``cdcp`` (CDCP alone at the twin's reduction, calibrated),
``tome`` (ToMe, merges undone) and ``token_pruning`` (EViT, drops filled in), both at the twin's backbone FLOPs.
Each trains a probe (frozen backbone; ``--backbone-lr`` for end to end) at the first size with
``python -m cait.dense``'s engine, in ``OUT/<backbone>/`` (resumable: a finished one is reused). Then for every size
the segmenters are scored on the held-out split rendered at that size (mIoU, per-class IoU) and timed in
alternation on the same input: images/s at ``--batch-size-speed`` and latency at batch 1. At a size other than the
training one the backbone is resized (position embedding resampled, merges moved) and ToMe and token pruning are
re-scheduled to the twin's backbone FLOPs there. Prints one JSON object with a ``rows`` list and writes it to
``OUT/dense.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cait  # noqa: E402
from cait.baselines.token_pruning import apply_token_pruning, token_pruning_schedule  # noqa: E402
from cait.baselines.tome import apply_tome, tome_schedule  # noqa: E402
from cait.data.segmentation import SyntheticSegmentation  # noqa: E402
from cait.dense.checkpoint import load_segmenter, segmenter_flops  # noqa: E402
from cait.dense.features import backbone_kind  # noqa: E402
from cait.dense.train import SegmentConfig, segment  # noqa: E402
from cait.io.bundled import bundled_pair  # noqa: E402
from cait.measure.segmentation import evaluate_segmentation  # noqa: E402
from cait.measure.speed import throughput_and_latency  # noqa: E402
from cait.models.deit import resize_input  # noqa: E402

BACKBONES = ("original", "cait", "atme", "cdcp", "tome", "token_pruning")


def configs(a, twin_reduction: float, layout: str) -> dict[str, SegmentConfig]:
    common = dict(data="synthetic", img_size=a.sizes[0], steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                  backbone_lr=a.backbone_lr, train_size=a.train_size, val_size=a.val_size,
                  eval_interval=a.steps, ckpt_interval=max(10, a.steps // 4), seed=a.seed, device=a.device,
                  calibration_size=a.calibration_size)
    spec = {"original": ("bundled:original", "none"), "cait": ("bundled:cait", "none"),
            "atme": ("bundled:original", "atme"), "cdcp": ("bundled:original", "cdcp"),
            "tome": ("bundled:original", "tome"), "token_pruning": ("bundled:original", "token_pruning")}
    return {b: SegmentConfig(backbone=spec[b][0], baseline=spec[b][1], flops_reduction=round(twin_reduction, 4),
                             merge=layout if b == "atme" else None, output=str(a.out / b), **common)
            for b in a.backbones}


def train_or_reuse(cfg: SegmentConfig) -> None:
    out = Path(cfg.output)
    if (out / "segmenter" / "segmenter.json").is_file():
        return
    cfg.resume = (out / "log.jsonl").is_file() and any(out.glob("train_state-*.json"))
    t0 = time.perf_counter()
    segment(cfg)
    print(f"[{out.name}] trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def at_size(seg, size: int, name: str, original: torch.nn.Module, twin_flops: int):
    """A copy of ``seg`` for inputs of ``size`` px; ToMe / token pruning re-scheduled to the twin's FLOPs there."""
    seg = copy.deepcopy(seg)
    if size == seg.backbone.patch_embed.img_size[0]:
        return seg
    kind = backbone_kind(seg.backbone)
    resize_input(seg.backbone, size)                           # position embedding resampled, merges moved
    if kind in ("tome", "token_pruning"):                      # re-schedule the baseline for this size's FLOPs
        base = resize_input(copy.deepcopy(original), size)
        base.load_state_dict(seg.backbone.state_dict())        # the segmenter's own (resampled) weights
        target = 1 - twin_flops / cait.count_flops(base)
        seg.backbone = (apply_tome(base, tome_schedule(base, target)) if kind == "tome"
                        else apply_token_pruning(base, token_pruning_schedule(base, target)))
    return seg.eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bundled", choices=["bundled"], help="the pair whose twin is compared")
    p.add_argument("--img-size", default="224", help="sizes in px, comma-separated; the first is the training size")
    p.add_argument("--val-size", type=int, default=1000, help="held-out synthetic images")
    p.add_argument("--score-at", default=None, help="sizes at which to score mIoU (default: every size; the rest "
                                                   "are timed only, their miou null)")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone-lr", type=float, default=None, help="train end to end at this LR (default: probes)")
    p.add_argument("--calibration-size", type=int, default=256, help="images the atme and cdcp baselines calibrate on")
    p.add_argument("--batch-size-speed", type=int, default=8, help="batch of the throughput measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backbones", default=",".join(BACKBONES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/dense"))
    a = p.parse_args(argv)
    a.sizes = [int(s) for s in a.img_size.split(",")]
    a.score_at = a.sizes if a.score_at is None else [int(s) for s in a.score_at.split(",")]
    a.backbones = [b for b in a.backbones.split(",") if b]
    pair = bundled_pair()
    if pair is None:
        raise SystemExit("error: the bundled pair is not in this checkout (assets/)")
    original, twin = pair.load()
    for m in (original, twin):
        resize_input(m, a.sizes[0])
    reduction = 1 - cait.count_flops(twin) / cait.count_flops(original)
    for cfg in configs(a, reduction, twin.cait_meta.merge).values():
        train_or_reuse(cfg)
    segs = {b: load_segmenter(a.out / b / "segmenter") for b in a.backbones}
    rows = []
    for size in a.sizes:
        twin_flops = cait.count_flops(resize_input(copy.deepcopy(twin), size))
        here = {b: at_size(s, size, b, original, twin_flops) for b, s in segs.items()}
        val = SyntheticSegmentation(a.val_size, size, a.seed, "val") if size in a.score_at else None
        speed = throughput_and_latency(here, a.batch_size_speed, a.device, iters=3, rounds=a.rounds, img_size=size)
        for b, seg in here.items():
            score = evaluate_segmentation(seg, val, seg.num_classes, a.device) if size in a.score_at else None
            backbone_flops, total = segmenter_flops(seg, size)
            rows.append({"backbone": b, "img_size": size, "trained_at": a.sizes[0],
                         "miou": score and score.miou, "per_class_iou": score and score.per_class_iou,
                         "pixel_accuracy": score and score.pixel_accuracy,
                         "backbone_flops": backbone_flops, "segmenter_flops": total,
                         "images_per_s": speed[b]["images_per_s"], "batch_size": a.batch_size_speed,
                         "latency_ms_batch1": speed[b]["latency_ms"], "rounds": speed[b]["rounds"],
                         "images_per_s_range": [speed[b]["images_per_s_spread"].low,
                                                speed[b]["images_per_s_spread"].high]})
        ref = next(r for r in rows if r["img_size"] == size and r["backbone"] == "original") \
            if "original" in here else None
        for r in rows:
            if ref and r["img_size"] == size:
                r["speedup"] = r["images_per_s"] / ref["images_per_s"]
                r["latency_speedup"] = ref["latency_ms_batch1"] / r["latency_ms_batch1"]
                if next(iter(here)) == "original":            # round by round against the original: the spread
                    up, lat = speed[r["backbone"]]["speedup"], speed[r["backbone"]]["latency_speedup"]
                    r["speedup_range"], r["latency_speedup_range"] = [up.low, up.high], [lat.low, lat.high]
                r["miou_vs_original"] = None if r["miou"] is None else r["miou"] - ref["miou"]
    out = {"model": a.model, "steps": a.steps, "batch_size": a.batch_size, "val_size": a.val_size,
           "frozen": a.backbone_lr is None, "device": a.device, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "twin_flops_reduction": reduction, "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "dense.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
