"""Reproduce the bundled offline weights: a DeiT-Tiny trained from scratch on synthetic shapes, and its CAIT twin.

    python assets/train_offline_weights.py                 # recipe picked by device: gpu if CUDA, else cpu
    python assets/train_offline_weights.py --recipe cpu    # the scaled-down recipe the shipped weights came from
    python assets/train_offline_weights.py --export-only   # re-export assets/ from finished runs

Every stage is a ``cait.finetune`` run (seed 0), so the script is the engine plus bookkeeping:

1. ``stage1``: DeiT-Tiny (timm's architecture) from random initialisation, FLOPs reduction 0 (a plain DeiT).
   Every stage trains with token labelling (``--token-labels``: each patch token also predicts its patch's label
   from the synthetic object masks), which gets a ViT from scratch off the plateau it otherwise sits on. The CPU
   recipe trains this stage at 112 px (a 7×7 grid, ~5× cheaper per image) for 5,000 steps of 64 — scaled down, said
   so in the provenance (held-out top-1 at 112 px: 28 / 47 / 60 / 67 / 74 / 75.6% after 500 / 1,500 / 2,500 /
   3,500 / 4,500 / 5,000 steps).
2. ``stage1b``: the same model, still at 112 px, trained 6,000 more steps of 64 with its own cosine schedule (a warm
   restart, LR 4e-4, no distillation): stage 1 was still gaining 1–2 points per 500 steps at its end. 63.2 / 70.5 /
   76.8 / 81.7 / 84.3 / 88.6 / 88.4% after 500 / 1,500 / 2,500 / 3,500 / 4,500 / 5,500 / 6,000 steps (the restart
   costs ~12 points for the first 1,000 steps, then passes stage 1 at 2,500).
3. ``stage2``: the same model at 224 px (position embedding resampled by timm), a fine-tune (FixRes-style) of 1,600
   steps of 32: 88.4% at 112 px is 40.8% at 224 px before it, then 79.3 / 84.7 / 89.3 / 90.8 / 90.9% after
   200 / 600 / 1,000 / 1,400 / 1,600 steps. The GPU recipe trains at 224 px from the start and skips stages 1b and 2.
4. ``twin``: CAIT from stage 2's model — ATME ``h5,v10`` + CDCP to 50% fewer FLOPs (the paper's DeiT-Tiny
   setting), kept widths in multiples of 8. The layout puts more of the budget on CDCP than the planner's default
   (share 0.8 → ``h4,v9``) so that both fp16 checkpoints fit in 20 MB. Hard distillation from the teacher
   (α = 0.1, the paper's DeiT-Tiny setting); compactors at the model's LR, masked rows shrunk by the engine's
   proximal group-lasso step (an earlier engine gave the compactors LR 0.02 so masked rows could reach 0 inside
   AdamW; that noise took this teacher to chance within 50 steps, see ``cait.finetune.lasso``). 3,000 steps of 32 (the
   FLOPs target reaches 50% at step 1,500): 71.5 / 79.0 / 82.0 / 83.0 / 86.6 / 89.2 / 91.4 / 91.2% after 200 / 600 /
   1,000 / 1,400 / 1,800 / 2,200 / 2,600 / 3,000 steps, 0.3 points above its 90.9% teacher (the issue asks for within
   1). A 1,400-step twin stage ended 4.4 points below, still rising.

Then both are written to ``assets/`` as fp16 safetensors + ``config.json`` + ``provenance.json`` (command, seed,
data set, steps, device, top-1, FLOPs, params, attention localisation on the held-out split, training cost, date).
Top-1 and localisation are measured on the fp16 files as shipped. Interrupted? Run it again: each stage resumes from
its newest training state, and finished stages are skipped; each stage's time is summed from its log, so an
interruption loses none of it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cait  # noqa: E402
from cait.data.datasets import build_datasets  # noqa: E402
from cait.data.synthetic import CLASSES  # noqa: E402
from cait.finetune.config import FinetuneConfig  # noqa: E402
from cait.finetune.engine import finetune  # noqa: E402
from cait.finetune.records import FinalRecord, of_type, to_dict  # noqa: E402
from cait.finetune.rundir import read_log, state_files, training_seconds  # noqa: E402
from cait.io.bundled import ORIGINAL_DIR, PROVENANCE_NAME, TWIN_DIR  # noqa: E402
from cait.io.checkpoint import CONFIG_NAME  # noqa: E402
from cait.measure.accuracy import evaluate  # noqa: E402
from cait.measure.attention import localisation_score  # noqa: E402

SEED = 0
VAL_SIZE = 1000
TWIN_LAYOUT = "h5,v10"
COMMON = dict(data="synthetic", seed=SEED, val_size=VAL_SIZE, synthetic_size=1_000_000, mixup=0.0, cutmix=0.0,
              log_interval=50, min_lr=1e-5, lr_warmup=0.05)

RECIPES: dict[str, dict[str, dict]] = {
    # Scaled down for a 2-core CPU. Token labelling (cait.finetune.token_labels) in every stage: without it the ViT sat
    # at chance for ~1000 steps and ended at 28.7% after 2 h; the teacher trains at 112 px (7×7 tokens, ~5× cheaper
    # per image), then at 224 px (position embedding resampled), then the twin at 224 px.
    "cpu": {
        "stage1": dict(model="deit_tiny_patch16_224", img_size=112, flops_reduction=0.0, steps=5000, batch_size=64,
                       lr=5e-4, label_smoothing=0.1, token_labels=1.0, eval_interval=500, ckpt_interval=250),
        # The same 112 px model trained on: a warm restart with its own cosine schedule (stage 1 was still gaining
        # 1-2 points per 500 steps at its end). 75.6% -> 88.4% at 112 px; it also transfers to 224 px far better.
        "stage1b": dict(model="@stage1", img_size=112, flops_reduction=0.0, steps=6000, batch_size=64, lr=4e-4,
                        label_smoothing=0.1, token_labels=1.0, distill_alpha=0.0, eval_interval=500,
                        ckpt_interval=250),
        "stage2": dict(model="@stage1b", img_size=224, flops_reduction=0.0, steps=1600, batch_size=32, lr=1.5e-4,
                       label_smoothing=0.1, token_labels=1.0, distill_alpha=0.0, eval_interval=200,
                       ckpt_interval=100),
        "twin": dict(model="@stage2", flops_reduction=0.5, merge=TWIN_LAYOUT, round_to=8, steps=3000, batch_size=32,
                     lr=1e-4, label_smoothing=0.1, token_labels=1.0, distill_alpha=0.1, eval_interval=200,
                     ckpt_interval=50),
    },
    # For tests: the same three stages on the tiny test DeiT, in about a minute.
    "smoke": {
        "stage1": dict(model="deit_test_patch4_32", img_size=16, flops_reduction=0.0, steps=20, batch_size=16,
                       lr=1e-3, eval_interval=20, ckpt_interval=10, val_size=32),
        "stage2": dict(model="@stage1", img_size=32, flops_reduction=0.0, steps=10, batch_size=16, lr=1e-3,
                       distill_alpha=0.0, eval_interval=10, ckpt_interval=10, val_size=32),
        "twin": dict(model="@stage2", flops_reduction=0.5, steps=20, batch_size=16, lr=1e-3, eval_interval=20,
                     ckpt_interval=10, val_size=32),
    },
    # Not run here (no GPU was available when the shipped weights were made); sized for about an hour on one GPU.
    "gpu": {
        "stage1": dict(model="deit_tiny_patch16_224", img_size=224, flops_reduction=0.0, steps=20000,
                       batch_size=256, lr=1e-3, label_smoothing=0.1, token_labels=1.0, eval_interval=2000,
                       ckpt_interval=1000),
        "twin": dict(model="@stage1", flops_reduction=0.5, merge=TWIN_LAYOUT, round_to=8, steps=5000,
                     batch_size=256, lr=2e-4, label_smoothing=0.1, token_labels=1.0, distill_alpha=0.1,
                     eval_interval=1000, ckpt_interval=500),
    },
}


def stage_config(recipe: str, stage: str, work: Path, device: str) -> FinetuneConfig:
    """The engine configuration of one stage; ``@name`` models point at an earlier stage's result."""
    args = dict(COMMON, **RECIPES[recipe][stage])
    if args["model"].startswith("@"):
        args["model"] = str(work / args["model"][1:] / "compact")
    return FinetuneConfig(**args, device=device, output=str(work / stage))


def run_stage(cfg: FinetuneConfig) -> dict:
    """Run (or resume, or skip when finished) one stage; returns its final summary with ``wall_s``, the seconds it
    spent training (:func:`training_seconds`)."""
    out = Path(cfg.output)
    if (out / "compact" / CONFIG_NAME).is_file():
        print(f"[{out.name}] finished earlier, skipped", flush=True)
    else:
        cfg.resume = bool(state_files(out))
        print(f"[{out.name}] {'resuming' if cfg.resume else 'starting'}: {cfg.steps} steps at "
              f"{cfg.img_size or 224} px on {cfg.device}", flush=True)
        finetune(cfg)
    records = read_log(out)
    return {**to_dict(of_type(records, FinalRecord)[-1]), "wall_s": training_seconds(records)}


def measure(path: Path, device: str, val_size: int) -> dict:
    """Top-1, FLOPs, params and attention localisation of a checkpoint as shipped (fp16 on disk)."""
    model = cait.load_pretrained(path, device)
    size = int(model.patch_embed.img_size[0])
    _, val, _ = build_datasets("synthetic", size, SEED, val_size=val_size)
    return {"top1": evaluate(model, val, torch.device(device)), "flops": cait.count_flops(model),
            "params": cait.count_params(model), "img_size": size,
            "localisation": localisation_score(model, images=val_size, seed=SEED, device=device)}


def _portable(cfg: FinetuneConfig, recipe: str, stage: str) -> dict:
    """A stage's configuration without machine-specific paths (``@stage`` names the earlier stage's result)."""
    out = {k: v for k, v in cfg.to_dict().items() if k not in ("output", "resume", "stop_at", "device")}
    out["model"] = RECIPES[recipe][stage]["model"]
    return out


def export(recipe: str, work: Path, out: Path, device: str, finals: dict[str, dict], command: str) -> dict:
    """Write both fp16 checkpoints and their provenance into ``out``; returns the provenance of both."""
    stages = list(RECIPES[recipe])
    teacher_stage = stages[-2]
    env = {"device": device, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "timm": __import__("timm").__version__, "python": platform.python_version()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    configs = {s: stage_config(recipe, s, work, device) for s in stages}
    twin_cfg, val_size = configs[stages[-1]], configs[stages[-1]].val_size
    provenance = {}
    for name, src, used in ((ORIGINAL_DIR, work / teacher_stage / "compact", stages[:-1]),
                            (TWIN_DIR, work / stages[-1] / "compact", stages)):
        model = cait.load_pretrained(src)
        if model.cait_meta.config is not None:   # the run's configuration, without this machine's paths
            model.cait_meta.config = _portable(configs[used[-1]], recipe, used[-1])
        dest = cait.save_pretrained(model, out / name, dtype=torch.float16)
        numbers = measure(dest, device, val_size)
        provenance[name] = {
            "what": (f"{model.pretrained_cfg['architecture']} (timm's architecture, {model.num_classes} classes), "
                     "trained from random initialisation" if name == ORIGINAL_DIR else
                     f"CAIT twin of {ORIGINAL_DIR}: ATME {cait.format_layout(cait.get_layout(model)) or 'none'} + "
                     "CDCP, fine-tuned from it with cait.finetune (hard distillation from it)"),
            "command": command, "recipe": recipe, "seed": SEED,
            "scaled_down": (recipe != "gpu") and (
                f"CPU recipe: the teacher trains at {configs[stages[0]].img_size} px and then "
                f"{configs[teacher_stage].steps:,} steps at {configs[teacher_stage].img_size} px, the twin "
                f"fine-tunes {twin_cfg.steps:,} steps of {twin_cfg.batch_size} images; far fewer images than a GPU run "
                "would use (see stages)"),
            "data": {"name": "cait.data.synthetic.SyntheticShapes", "classes": list(CLASSES), "seed": SEED,
                     "train": "split 'train', a fresh stream image per training sample (synthetic_size 1,000,000)",
                     "held_out": f"split 'val', images 0..{val_size - 1}, rendered at the model's input size"},
            "stages": [{"stage": s, "config": _portable(configs[s], recipe, s),
                        "images_seen": finals[s]["step"] * configs[s].batch_size,
                        "top1_at_end": finals[s]["top1_student"], "wall_s": round(finals[s]["wall_s"], 3)}
                       for s in used],
            "environment": env,
            "training_cost_s": round(sum(finals[s]["wall_s"] for s in used), 1),
            "date": datetime.date.today().isoformat(),
            **numbers,
            "flops_g": round(numbers["flops"] / 1e9, 4),
            "fp16_bytes": (dest / "model.safetensors").stat().st_size,
        }
        (dest / PROVENANCE_NAME).write_text(json.dumps(provenance[name], indent=2) + "\n")
    return provenance


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=["auto", *RECIPES], default="auto",
                   help="gpu when CUDA is available, else cpu (default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--work", default=str(ROOT / "runs" / "assets"), help="run directories of the stages")
    p.add_argument("--out", default=str(ROOT / "assets"), help="where the two checkpoints are written")
    p.add_argument("--export-only", action="store_true", help="only export finished stages")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    recipe = a.recipe if a.recipe != "auto" else ("gpu" if device == "cuda" else "cpu")
    work = Path(a.work)
    finals = {}
    for stage in RECIPES[recipe]:
        cfg = stage_config(recipe, stage, work, device)
        if a.export_only and not (Path(cfg.output) / "compact").is_dir():
            raise SystemExit(f"{cfg.output}: not finished; run without --export-only")
        finals[stage] = run_stage(cfg)
    command = f"python assets/train_offline_weights.py --recipe {recipe}"
    provenance = export(recipe, work, Path(a.out), device, finals, command)
    summary = {k: {m: v[m] for m in ("top1", "flops_g", "params", "localisation", "training_cost_s", "fp16_bytes")}
               for k, v in provenance.items()}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
