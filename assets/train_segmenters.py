"""Reproduce the bundled segmenters: Semantic FPN probes on the bundled DeiT-Tiny, its CAIT twin, and ToMe and token
pruning at the twin's FLOPs (the app's Segmentation tab shows them offline).

    python assets/train_segmenters.py                      # train (resumable), then export into assets/segmenters/
    python assets/train_segmenters.py --work runs/dense    # reuse benchmarks/dense.py's runs (same recipe, checked)

Each is ``python -m cait.dense``'s engine with one recipe (frozen backbone, 300 steps of 16 synthetic images at
224 px, AdamW 1e-3 cosine, seed 0, scored on 1000 held-out images): the same decoder, steps and seed for every
backbone, so the comparison is the backbones'. A finished run in ``--work`` is reused only if its logged
configuration equals the recipe field by field. The export keeps the decoder in fp16 and refers to the bundled
backbone instead of copying it (``segmenter.json`` ``"bundled"``), with ``provenance.json`` beside it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cait  # noqa: E402
from cait.dense.checkpoint import load_segmenter, save_segmenter  # noqa: E402
from cait.dense.records import SegmentEvalRecord, SegmentStartRecord, SegmentTrainRecord  # noqa: E402
from cait.dense.train import SegmentConfig, segment  # noqa: E402
from cait.finetune.records import of_type  # noqa: E402
from cait.finetune.rundir import changed_fields, read_log, training_seconds  # noqa: E402
from cait.io.bundled import ASSETS_DIR, bundled_pair  # noqa: E402

SEGMENTERS = {"original": ("bundled:original", "none", "original"), "cait": ("bundled:cait", "none", "cait"),
              "tome": ("bundled:original", "tome", "original"),
              "token_pruning": ("bundled:original", "token_pruning", "original")}
"""Asset name → (backbone, baseline, the bundled backbone it reads)."""


def recipe(name: str, work: Path, twin_reduction: float) -> SegmentConfig:
    backbone, baseline, _ = SEGMENTERS[name]
    return SegmentConfig(backbone=backbone, baseline=baseline, flops_reduction=round(twin_reduction, 4),
                         data="synthetic", img_size=224, steps=300, batch_size=16, lr=1e-3, train_size=2000,
                         val_size=1000, eval_interval=300, ckpt_interval=75, seed=0, device="cpu",
                         output=str(work / name))


def check_same(cfg: SegmentConfig, run: Path) -> None:
    """A finished run is reused only if its logged configuration is the recipe's (fields not logged: defaults)."""
    start = of_type(read_log(run), SegmentStartRecord)
    if not start:
        raise SystemExit(f"error: {run}: no start record")
    diff = changed_fields(cfg, start[0].config)
    if diff:
        raise SystemExit(f"error: {run} was trained with another configuration ({', '.join(diff)}); "
                         "choose another --work")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "assets" / "segmenters")
    p.add_argument("--out", type=Path, default=ASSETS_DIR / "segmenters")
    p.add_argument("--names", default=",".join(SEGMENTERS))
    a = p.parse_args(argv)
    pair = bundled_pair()
    if pair is None:
        raise SystemExit("error: the bundled pair is not in this checkout (assets/)")
    original, twin = pair.load()
    reduction = 1 - cait.count_flops(twin) / cait.count_flops(original)
    summary = {}
    for name in a.names.split(","):
        cfg = recipe(name, a.work, reduction)
        run = Path(cfg.output)
        if (run / "segmenter" / "segmenter.json").is_file():
            check_same(cfg, run)
            print(f"[{name}] finished earlier, reused", flush=True)
        else:
            cfg.resume = any(run.glob("train_state-*.json"))
            segment(cfg)
        seg = load_segmenter(run / "segmenter")
        trained = json.loads((run / "segmenter" / "segmenter.json").read_text())
        score = trained["score"]                                        # the run's, on 1000 held-out images
        portable = {k: v for k, v in cfg.to_dict().items() if k not in ("output", "resume")}
        dest = save_segmenter(seg, a.out / name, classes=seg.classes, what=trained["backbone"]["what"],
                              config=portable, score=SegmentEvalRecord(step=cfg.steps, **score),
                              bundled_backbone=SEGMENTERS[name][2], dtype=torch.float16)
        seconds = training_seconds(read_log(run), SegmentTrainRecord, SegmentStartRecord)
        prov = {"recipe": portable, "score": score, "training_s": round(seconds, 1), "torch": torch.__version__,
                "decoder_bytes": (dest / "decoder.safetensors").stat().st_size,
                "command": "python assets/train_segmenters.py", "date": time.strftime("%Y-%m-%d")}
        (dest / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
        summary[name] = {"miou": score["miou"], "training_s": prov["training_s"],
                         "decoder_bytes": prov["decoder_bytes"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
