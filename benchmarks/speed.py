"""Speed of CAIT models against their originals: original, ATME-only, CDCP-only, CAIT and the ToMe baseline at CAIT's
FLOPs and at ATME-only's FLOPs (the paper's Tab. XV), for DeiT-T/S/B.

    python benchmarks/speed.py --device cpu --batch-sizes 1,32 --precisions fp32 --out runs/speed_cpu
    python benchmarks/speed.py --device cuda --batch-sizes 1,32,64,128,256 --precisions fp32,bf16 --out runs/speed_gpu
    python benchmarks/speed.py --device cpu --runtime onnxruntime --out runs/speed_ort    # exported, ONNX Runtime
    python benchmarks/speed.py --device cpu --precisions fp32,bf16,bf16-autocast,int8 --variants original,cait,tome

Precisions (:mod:`cait.measure.precision`): ``fp32``; ``bf16`` (bf16 weights); ``bf16-autocast``; ``int8`` (dynamic
quantisation of the Linears, CPU). In each precision the fp32 original is timed in the same alternation
(``original_fp32``), so every row has its speed-up against the same-precision original *and* against fp32
(``speedup_vs_fp32``), its achieved GFLOP/s (2 per multiply-add) and the device's peak in that precision, measured by
a large matmul in the same run (``share_of_peak``). ``--accuracy N`` scores the bundled pair (and ToMe at the twin's
FLOPs) on N held-out synthetic images in every precision: top-1 and agreement with its own fp32 predictions.

For every model, batch size and precision the six variants are timed in alternation on the same input (warm-up,
then several rounds; CUDA events on GPU, wall clock on CPU; medians); batch 1 gives the latency of one image. In
fp32 PyTorch runs every row also has each block's attention time (``attention_ms``). Weights are random: speed does
not depend on them. Writes ``OUT/speed.json`` (every row), ``OUT/speedup.png`` (speed-up against the FLOPs-ideal
1/(1-r)) and prints a table with the issue's targets and where each stands.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cait  # noqa: E402
from cait.baselines.tome import apply_tome, tome_flops, tome_schedule  # noqa: E402
from cait.measure.precision import PRECISIONS, check_precision, in_precision, peak_gflops  # noqa: E402
from cait.measure.speed import compare_throughput, resolve_device, speedup_spread  # noqa: E402

SETTINGS = {  # total FLOPs reduction of the paper's CAIT models (paper Tab. III)
    "deit_tiny_patch16_224": 0.50,
    "deit_small_patch16_224": 0.55,
    "deit_base_patch16_224": 0.58,
}
TARGETS = {  # (variant, model) → GPU bf16 batch-256 speed-up target; CPU target is 90% of the FLOPs-ideal
    ("cait", "deit_small_patch16_224"): 2.0,
    ("cait", "deit_tiny_patch16_224"): 1.8,
    ("cait", "deit_base_patch16_224"): 2.2,
    ("atme", "deit_small_patch16_224"): 1.75,
}
VARIANTS = ("original", "atme", "cdcp", "cait", "tome", "tome_atme")


def variants(name: str, round_to: int, keep: tuple[str, ...] = VARIANTS) -> dict[str, torch.nn.Module]:
    """original, ATME-only (the layout CAIT plans for R), CDCP-only (R by channels alone), CAIT (both), ToMe
    (token merging, cait.baselines.tome) scheduled to CAIT's FLOPs, and ToMe scheduled to ATME-only's FLOPs
    (``tome_atme``: the paper's Tab. XV comparison, ATME 1.8× against ToMe 1.5× for DeiT-S on a GPU)."""
    original, _ = cait.create_model(name, pretrained=False)
    r = SETTINGS.get(name, 0.5)
    split = cait.split_budget(original, r)
    out = {"original": original, "cait": cait.compress(original, r, round_to=round_to)}
    if "atme" in keep or "tome_atme" in keep:
        out["atme"] = cait.apply_atme(cait.create_model(name, pretrained=False)[0], split.layout)
    if "cdcp" in keep:                     # built only when asked for (a RoPE model may not reach R by channels)
        out["cdcp"] = cait.compress(original, r, layout="", round_to=round_to)
    base = cait.analytic_flops(original)

    def tome_at_flops_of(model: torch.nn.Module) -> torch.nn.Module:
        achieved = 1 - cait.analytic_flops(model) / base
        return apply_tome(cait.create_model(name, pretrained=False)[0], tome_schedule(original, achieved))

    if "tome" in keep:                     # built only when asked for (ToMe costs a model copy)
        out["tome"] = tome_at_flops_of(out["cait"])
    if "tome_atme" in keep:
        out["tome_atme"] = tome_at_flops_of(out["atme"])
    return {k: m.eval() for k, m in out.items() if k in keep}


def bundled_accuracy(precisions: list[str], n: int, device: torch.device) -> list[dict]:
    """Held-out top-1 (%) of the bundled original, its twin and ToMe at the twin's FLOPs in every precision, and the
    share of images (%) on which each precision predicts what the same model predicts in fp32 (accuracy
    beside every speed). Empty without the bundled pair."""
    from cait.data.datasets import build_datasets
    from cait.io.bundled import bundled_pair
    pair = bundled_pair()
    if pair is None or n <= 0:
        return []
    original, twin = pair.load(device)
    reduction = 1 - cait.analytic_flops(twin) / cait.analytic_flops(original)
    import copy
    models = {"original": original, "cait": twin,
              "tome": apply_tome(copy.deepcopy(original), tome_schedule(original, reduction)).eval()}
    _, val, _ = build_datasets("synthetic", int(original.patch_embed.img_size[0]), val_size=n)
    xs, ys = zip(*(val[i] for i in range(len(val))))
    x, y = torch.stack(xs), torch.tensor(ys)

    def predict(m: torch.nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([m(x[i:i + 50].to(device)).argmax(-1).cpu() for i in range(0, len(x), 50)])

    rows = []
    for variant, m in models.items():
        ref = predict(m)
        for prec in precisions:
            pred = ref if prec == "fp32" else predict(in_precision(m, prec, device))
            rows.append({"model": "bundled deit_tiny (synthetic)", "variant": variant, "precision": prec,
                         "images": len(y), "top1": round(100 * float((pred == y).float().mean()), 2),
                         "agreement_with_fp32": round(100 * float((pred == ref).float().mean()), 2)})
    return rows


def compiled(model: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """``torch.compile(model)`` if it runs (checked on one image), else the eager model: (model, compiled)."""
    try:
        c = torch.compile(model)
        with torch.inference_mode():
            c(torch.randn(1, 3, 224, 224) if not hasattr(model, "patch_embed") else
              torch.randn(1, 3, *model.patch_embed.img_size))
        return c, True
    except Exception as e:  # inductor raises many types; a variant that cannot compile is timed eager, and says so
        print(f"torch.compile failed ({type(e).__name__}); timing eager", file=sys.stderr)
        return model, False


def flops_of(model: torch.nn.Module) -> int:
    """FLOPs (multiply-adds, one image) by the closed form; ToMe's own for the baseline."""
    return tome_flops(model) if getattr(model, "tome", None) is not None else cait.analytic_flops(model)


def onnx_runners(models: dict[str, torch.nn.Module], where: Path) -> dict:
    """Each model exported to ONNX (parity-checked, cait.export) and opened in an ONNX Runtime CPU session."""
    from cait.io.export import export_model, onnx_session
    return {k: onnx_session(export_model(m, "onnx", where / f"{k}.onnx")["path"]) for k, m in models.items()}


def ort_throughput(sessions: dict, original: torch.nn.Module, batch_size: int, warmup: int, iters: int,
                   rounds: int) -> dict[str, dict]:
    """Images/s of ONNX Runtime sessions, timed in alternation on the same input (medians, wall clock)."""
    import statistics
    import time
    x = torch.randn(batch_size, 3, *original.patch_embed.img_size).numpy()
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(iters):
                t0 = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t0)
    return {k: {"images_per_s": batch_size / statistics.median(v), "latency_s": statistics.median(v),
                "round_images_per_s": [batch_size / statistics.median(v[r * iters:(r + 1) * iters])
                                       for r in range(rounds)]}
            for k, v in times.items()}


def attention_ms(model: torch.nn.Module, batch_size: int, device: torch.device, repeats: int = 3) -> list[float]:
    """Median milliseconds of each block's attention module for one batch (forward hooks around ``block.attn``),
    so a block whose attention leaves the fused kernel shows (PrunedAttention pads q/k ≠ v for it)."""
    import statistics
    import time
    marks: dict[int, list[float]] = {i: [] for i in range(len(model.blocks))}
    started: dict[int, float] = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        hooks.append(block.attn.register_forward_pre_hook(
            lambda m, a, i=i: started.__setitem__(i, time.perf_counter())))
        hooks.append(block.attn.register_forward_hook(
            lambda m, a, o, i=i: marks[i].append(1e3 * (time.perf_counter() - started[i]))))
    x = torch.randn(batch_size, 3, *model.patch_embed.img_size, device=device)
    try:
        with torch.inference_mode():
            for _ in range(repeats + 1):
                model.to(device).eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return [round(statistics.median(v[1:]), 2) for v in marks.values()]      # the first pass is a warm-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(SETTINGS), help="comma-separated timm names")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated (1: latency of one image)")
    p.add_argument("--precisions", default="fp32", help=f"comma-separated: {', '.join(PRECISIONS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    p.add_argument("--peak-size", type=int, default=4096, help="side of the square matmul that measures the peak")
    p.add_argument("--accuracy", type=int, default=0,
                   help="score the bundled pair in every precision on this many held-out images (0: skip)")
    p.add_argument("--round-to", type=int, default=8, help="kept widths in multiples of this (1 = exact)")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant (measured, not assumed)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="time the PyTorch models, or their ONNX exports under ONNX Runtime (CPU; cait.export)")
    p.add_argument("--out", default="runs/speed")
    a = p.parse_args()
    dev = resolve_device(a.device)
    precisions = [check_precision(q, dev) for q in a.precisions.split(",")]
    keep = tuple(a.variants.split(","))
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    peaks = {q: round(peak_gflops(q, dev, n=a.peak_size), 1) for q in precisions} if a.runtime == "torch" else {}
    print("peak GFLOP/s (2 per multiply-add, large matmul): " + json.dumps(peaks), flush=True)
    rows = []
    for name in a.models.split(","):
        models = variants(name, a.round_to, keep)
        flops = {k: flops_of(m) for k, m in models.items()}
        for prec in precisions:
            rows += time_precision(a, name, models, flops, prec, peaks.get(prec), dev, out_dir)
    accuracy = bundled_accuracy(precisions, a.accuracy, dev) if a.runtime == "torch" else []
    meta = {"torch": torch.__version__, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
            "cpu", "threads": torch.get_num_threads(), "peak_gflops": peaks}
    (out_dir / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows, "accuracy": accuracy}, indent=2))
    report(rows, out_dir, accuracy)


def time_precision(a, name: str, models: dict, flops: dict, prec: str, peak: float | None, dev: torch.device,
                   out_dir: Path) -> list[dict]:
    """Rows of one model in one precision at every batch size; in a precision other than fp32 the fp32 original is
    timed in the same alternation, as the reference of ``speedup_vs_fp32``."""
    if a.runtime == "onnxruntime":
        if prec != "fp32":
            raise SystemExit("--runtime onnxruntime times the fp32 exports only (python -m cait.export --format "
                             "onnx-int8 writes an int8 one)")
        run, compiled_ok = onnx_runners(models, out_dir / "onnx" / name), {}
    else:
        run = {k: in_precision(m, prec, dev) for k, m in models.items()}
        if prec != "fp32":
            run = {"original_fp32": models["original"], **run}
        compiled_ok = {}
        if a.compile:
            for k in list(run):
                run[k], compiled_ok[k] = compiled(run[k])
    size = int(models["original"].patch_embed.img_size[0])
    rows = []
    for bs in map(int, a.batch_sizes.split(",")):
        speed = (ort_throughput(run, models["original"], bs, a.warmup, a.iters, a.rounds)
                 if a.runtime == "onnxruntime" else
                 compare_throughput(run, bs, dev, a.warmup, a.iters, a.rounds, img_size=size))
        fp32_ref = "original_fp32" if "original_fp32" in speed else "original"
        for k in models:
            r = 1 - flops[k] / flops["original"]
            ips = speed[k]["images_per_s"]
            gflops = 2 * flops[k] * ips / 1e9
            up = speedup_spread(speed, k)                     # round by round: median, lowest and highest round
            rows.append({"model": name, "variant": k, "device": dev.type, "precision": prec, "batch_size": bs,
                         "flops": flops[k], "flops_reduction": r, "images_per_s": ips,
                         "latency_ms": 1e3 * speed[k]["latency_s"], "speedup": up.median,
                         "speedup_range": [up.low, up.high], "rounds": up.n,
                         "speedup_vs_fp32": speedup_spread(speed, k, fp32_ref).median, "ideal_speedup": 1 / (1 - r),
                         "gflops": gflops, "peak_gflops": peak, "share_of_peak": gflops / peak if peak else None,
                         "compiled": compiled_ok.get(k, False), "round_to": a.round_to, "runtime": a.runtime})
        if a.runtime == "torch" and prec == "fp32" and not a.compile:
            for row in rows[-len(models):]:
                row["attention_ms"] = attention_ms(models[row["variant"]], bs, dev)
        print(f"{name} {prec} batch {bs}: " + ", ".join(
            f"{r['variant']} {r['images_per_s']:.1f}/s ({r['speedup_vs_fp32']:.2f}x fp32 original)"
            for r in rows[-len(models):]), flush=True)
    return rows


def report(rows: list[dict], out_dir: Path, accuracy: list[dict] = ()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    df["of_ideal"] = df["speedup"] / df["ideal_speedup"]
    status = []
    for _, r in df.iterrows():
        tgt = TARGETS.get((r.variant, r.model))
        if r.variant == "original" or tgt is None:
            status.append("")
        elif r.device == "cuda":
            ok = r.batch_size == 256 and r.precision == "bf16"
            status.append(("met" if r.speedup >= tgt else "NOT met") + f" (>= {tgt}x)" if ok else "")
        else:
            ok = r.batch_size == 32 and r.precision == "fp32"
            status.append(("met" if r.of_ideal >= 0.9 else "NOT met") + " (>= 90% of ideal)" if ok else "")
    df["target"] = status
    df["speedup_min"] = [lo for lo, _ in df["speedup_range"]]
    df["speedup_max"] = [hi for _, hi in df["speedup_range"]]
    show = df[["model", "variant", "device", "precision", "batch_size", "flops_reduction", "images_per_s", "speedup",
               "speedup_min", "speedup_max", "speedup_vs_fp32", "ideal_speedup", "of_ideal", "gflops", "peak_gflops",
               "share_of_peak", "target"]]
    print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if accuracy:
        acc = pd.DataFrame(accuracy)
        print(acc.to_string(index=False))
        print(fastest_within(df, acc))
    fig, ax = plt.subplots(figsize=(6, 5))
    lim = max(df.ideal_speedup.max(), df.speedup.max()) * 1.1
    ax.plot([1, lim], [1, lim], "k--", lw=1, label="FLOPs-ideal 1/(1-r)")
    ax.plot([1, lim], [1, 0.9 * lim + 0.1], ":", color="grey", lw=1, label="90% of ideal")
    for (variant, prec), g in df[df.variant != "original"].groupby(["variant", "precision"]):
        ax.errorbar(g.ideal_speedup, g.speedup, yerr=[g.speedup - g.speedup_min, g.speedup_max - g.speedup],
                    fmt="o", capsize=3, label=f"{variant} {prec}")
    ax.set_xlabel("FLOPs-ideal speed-up 1/(1-r)")
    ax.set_ylabel("measured speed-up (median, bars: lowest-highest round)")
    ax.set_title(f"CAIT speed-ups ({df.device.iloc[0]})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "speedup.png", dpi=120)



def fastest_within(df, acc, model: str = "deit_small_patch16_224", points: float = 0.5, batch_size: int = 32) -> str:
    """The issue's check: the fastest CAIT ``model`` precision at ``batch_size`` whose bundled twin keeps its top-1
    within ``points`` of fp32, and its throughput against the fp32 original's."""
    twin = acc[acc.variant == "cait"].set_index("precision")["top1"]
    if "fp32" not in twin:
        return "no fp32 accuracy to compare with"
    ok = [q for q in twin.index if twin[q] >= twin["fp32"] - points]
    rows = df[(df.model == model) & (df.variant == "cait") & (df.batch_size == batch_size) & df.precision.isin(ok)]
    if rows.empty:
        return f"no CAIT {model} row at batch {batch_size} in a precision within {points} pt"
    best = rows.loc[rows.speedup_vs_fp32.idxmax()]
    return (f"fastest CAIT {model} within {points} pt of fp32 top-1 (bundled twin): {best.precision}"
            f"{' compiled' if best.compiled else ''}, {best.images_per_s:.1f} images/s at batch {batch_size} = "
            f"{best.speedup_vs_fp32:.2f}x the fp32 original (target >= 4x: "
            f"{'met' if best.speedup_vs_fp32 >= 4 else 'NOT met'})")


if __name__ == "__main__":
    main()
