"""Charts and tables for the app and notebooks: retained channels, FLOPs per block, cost, training curves,
compactor norms and CDCP against plain global selection.

Pure functions of library results (plotly for interactive charts, pandas for tables); image overlays are
:mod:`cait.viz.overlay`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..compress.importance import ChannelScores
from ..compress.select import ChannelMask
from ..dense.records import SegmentEvalRecord, SegmentTrainRecord
from ..finetune.records import EvalRecord, FinalRecord, Record, StartRecord, TrainRecord, of_type
from ..models.spec import ModelSpec


def channels_figure(original: ModelSpec, compressed: ModelSpec, title: str = "") -> go.Figure:
    """Retained channels per block (paper Fig. 6): q/k, v and FFN as % of the original, tokens per block on the right.

    Args:
        original, compressed: :func:`cait.models.spec.describe` of the two models (same depth).
    """
    blocks = list(range(len(original.blocks)))                               # 0-based, as ATME layouts are
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for name, get in (("q/k", lambda b: b.heads * b.qk_dim), ("v", lambda b: b.heads * b.v_dim),
                      ("FFN", lambda b: b.ffn_dim)):
        kept = [100.0 * get(c) / get(o) for o, c in zip(original.blocks, compressed.blocks)]
        text = [f"{get(c)}/{get(o)}" for o, c in zip(original.blocks, compressed.blocks)]
        fig.add_bar(x=blocks, y=kept, name=f"{name} kept (%)", text=text, textposition="none",
                    hovertemplate="block %{x}: %{y:.1f}% (%{text})<extra>" + name + "</extra>")
    fig.add_scatter(x=blocks, y=[b.tokens for b in compressed.blocks], name="tokens (CLS incl.)",
                    mode="lines+markers", line=dict(color="black", dash="dot"), secondary_y=True)
    fig.update_layout(barmode="group", title=title or "Retained channels per block", xaxis_title="block (0-based)",
                      legend=dict(orientation="h", y=-0.2), margin=dict(t=50, l=40, r=40, b=40), height=420)
    fig.update_yaxes(title_text="kept (% of original)", range=[0, 105], secondary_y=False)
    fig.update_yaxes(title_text="tokens", rangemode="tozero", secondary_y=True)
    return fig


def block_flops_figure(original: dict[str, int], compressed: dict[str, int], **others: dict[str, int]) -> go.Figure:
    """Per-part FLOPs (GFLOPs, multiply-adds) of two models and any ``others`` (name → the same kind of dict, e.g.
    the ToMe baseline), from :func:`cait.measure.flops.flops_by_block`."""
    names = list(original)
    fig = go.Figure()
    for label, d in (("original", original), ("compressed", compressed), *others.items()):
        fig.add_bar(x=names, y=[d.get(n, 0) / 1e9 for n in names], name=label)
    fig.update_layout(barmode="group", title="FLOPs per part (fvcore, multiply-adds)", yaxis_title="GFLOPs",
                      margin=dict(t=50, l=40, r=20, b=40), height=380, legend=dict(orientation="h", y=-0.25))
    return fig


def cost_table(rows: dict[str, dict], held_out: int | None = None) -> pd.DataFrame:
    """Summary table from ``{name: {"flops", "params", "top1"?, and, when timed, the
    :func:`cait.measure.speed.throughput_and_latency` entries}}``; the first row is the reference.

    Columns: held-out top-1 (%, on ``held_out`` images, stated in the header) first, so that a narrow table never
    hides it; GFLOPs (multiply-adds), params (M), FLOPs reduction (%), the FLOPs-ideal speed-up ``flops_ref / flops``;
    and when timed images/s, speed-up, latency at batch 1 (ms) and its speed-up, each as ``median (min–max)`` over
    the alternation rounds (:class:`cait.measure.speed.Spread`), and the rounds timed.
    """
    out = []
    ref = next(iter(rows.values()))
    for name, r in rows.items():
        row = {"model": name}
        if r.get("top1") is not None:
            row[f"held-out top-1 (%, n={held_out})" if held_out else "held-out top-1 (%)"] = round(r["top1"], 1)
        row.update({"GFLOPs": round(r["flops"] / 1e9, 3), "params (M)": round(r["params"] / 1e6, 2),
                    "FLOPs reduction (%)": round(100 * (1 - r["flops"] / ref["flops"]), 1),
                    "ideal speed-up": round(ref["flops"] / r["flops"], 2)})
        if "speedup" in r:
            row.update({"images/s": r["images_per_s_spread"].format(1), "speed-up": str(r["speedup"]),
                        "latency, batch 1 (ms)": r["latency_ms_spread"].format(1),
                        "latency speed-up": str(r["latency_speedup"]), "rounds": r["rounds"]})
        out.append(row)
    return pd.DataFrame(out)


def throughput_figure(rows: dict[str, dict]) -> go.Figure:
    """Images/s of each timed model: the median as a bar, the lowest and highest round as its error bar, from
    :func:`cait.measure.speed.throughput_and_latency` entries."""
    names = [k for k, r in rows.items() if "images_per_s_spread" in r]
    s = [rows[k]["images_per_s_spread"] for k in names]
    fig = go.Figure(go.Bar(x=names, y=[v.median for v in s], error_y=dict(
        type="data", symmetric=False, array=[v.high - v.median for v in s], arrayminus=[v.median - v.low for v in s])))
    batch = next((rows[k].get("batch_size") for k in names), None)
    fig.update_layout(title=f"Throughput at batch {batch}: median, bars min–max over {s[0].n if s else 0} rounds",
                      yaxis_title="images/s", margin=dict(t=50, l=40, r=20, b=40), height=380)
    return fig


def training_figure(records: list[Record]) -> go.Figure:
    """Live view of a fine-tune from its ``log.jsonl`` records: loss, top-1 (and, label-free, the agreement with the
    teacher; the final record's scores too), FLOPs target and |S| against step.

    The FLOPs axis starts at zero and reaches the original's FLOPs (from the start record), so a flat target does
    not look like a moving one; a run that started from a calibrated twin
    (:meth:`cait.finetune.records.StartRecord.pruned_before_training`) says in the |S| panel that its channels went
    before training.
    """
    train = of_type(records, TrainRecord)
    # Held-out scores: every evaluation, and the final record's (a short job may have no evaluation before it).
    evals = [r for r in records if isinstance(r, (EvalRecord, FinalRecord))]
    start = next(iter(of_type(records, StartRecord)), None)
    pruned_first = start is not None and start.pruned_before_training()
    label_free = any(r.agreement is not None for r in evals)
    fig = make_subplots(rows=2, cols=2, subplot_titles=(
        "loss", "top-1 / agreement (%)" if label_free else "top-1 (%)", "FLOPs target (G)",
        "|S| empty: pruned before training (calibrated)" if pruned_first else "|S| (units)"), vertical_spacing=0.18)
    steps = [r.step for r in train]
    fig.add_scatter(x=steps, y=[r.loss for r in train], name="loss", row=1, col=1)
    if any(r.top1_student is not None for r in evals):
        fig.add_scatter(x=[r.step for r in evals], y=[r.top1_student for r in evals], name="student",
                        mode="lines+markers", row=1, col=2)
    if label_free:
        fig.add_scatter(x=[r.step for r in evals], y=[r.agreement for r in evals], name="agreement with teacher",
                        mode="lines+markers", row=1, col=2)
    if evals and evals[0].top1_teacher is not None:
        fig.add_scatter(x=[r.step for r in evals], y=[r.top1_teacher for r in evals], name="teacher",
                        mode="lines", line=dict(dash="dash"), row=1, col=2)
    fig.add_scatter(x=steps, y=[None if r.flops_target is None else r.flops_target / 1e9 for r in train],
                    name="FLOPs target", row=2, col=1)
    if start is not None:
        fig.update_yaxes(range=[0, 1.05 * start.base_flops / 1e9], row=2, col=1)
        fig.add_hline(y=start.target_flops / 1e9, line=dict(dash="dot", color="grey"), row=2, col=1,
                      annotation_text="final target", annotation_position="bottom right")
    fig.add_scatter(x=steps, y=[r.s_size for r in train], name="|S|", row=2, col=2)
    fig.update_layout(height=520, showlegend=False, margin=dict(t=40, l=40, r=20, b=30))
    fig.update_xaxes(title_text="step", row=2)
    return fig


def segmentation_figure(records: list[Record]) -> go.Figure:
    """Live view of a segmentation run (:mod:`cait.dense.records`): pixel cross-entropy and held-out mIoU against
    step."""
    train, evals = of_type(records, SegmentTrainRecord), of_type(records, SegmentEvalRecord)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss (pixel cross-entropy)", "held-out mIoU (%)"))
    fig.add_scatter(x=[r.step for r in train], y=[r.loss for r in train], name="loss", row=1, col=1)
    fig.add_scatter(x=[r.step for r in evals], y=[r.miou for r in evals], name="mIoU", mode="lines+markers",
                    row=1, col=2)
    fig.update_layout(height=320, showlegend=False, margin=dict(t=40, l=40, r=20, b=30))
    fig.update_xaxes(title_text="step")
    return fig


def compactor_figure(scores: ChannelScores, mask: ChannelMask | None, title: str = "") -> go.Figure:
    """Compactor row norms as heatmaps (paper Fig. 7): q, k, v with one column per (head, channel), FFN per channel;
    rows are blocks, each panel on its own colour scale. Channels in S are overlaid in red; near-zero rows show as
    the darkest cells."""
    kinds = [("q", scores.q, None if mask is None else mask.qk), ("k", scores.k, None if mask is None else mask.qk),
             ("v", scores.v, None if mask is None else mask.v), ("FFN", scores.ffn, None if mask is None else mask.ffn)]
    fig = make_subplots(rows=4, cols=1, vertical_spacing=0.07,
                        subplot_titles=[f"{k}: ‖Q_j‖₂ per block and channel (S in red)" for k, _, _ in kinds])
    for i, (name, ts, ms) in enumerate(kinds, start=1):
        z = torch.stack([t.flatten() for t in ts]).numpy()                         # (blocks, H·d or D)
        fig.add_heatmap(z=z, zmin=0, zmax=max(float(z.max()), 1e-9), colorscale="Viridis", row=i, col=1,
                        colorbar=dict(len=0.2, y=1 - (i - 0.5) / 4, thickness=12),
                        hovertemplate="block %{y}, column %{x}: %{z:.3f}<extra>" + name + "</extra>")
        if ms is not None:
            s = torch.stack([m.flatten() for m in ms]).numpy().astype(float)
            s[s == 0] = np.nan
            fig.add_heatmap(z=s, zmin=0, zmax=1, colorscale=[[0, "red"], [1, "red"]], opacity=0.6,
                            showscale=False, hoverinfo="skip", row=i, col=1)
        fig.update_yaxes(title_text="block", autorange="reversed", row=i, col=1)
    fig.update_layout(height=900, title=title or "Compactor row norms", margin=dict(t=60, l=50, r=20, b=30))
    return fig


def consistency_figure(spec: ModelSpec, cdcp_widths: list[tuple[int, int, int]] | None,
                       global_widths: list[tuple[int, int, int]], title: str = "") -> go.Figure:
    """Per block: channels a batched attention can actually drop with CDCP (consistent S) and with plain global
    selection at the same FLOPs (paper Tab. XI / Fig. 7): q/k and v per head, FFN."""
    blocks = list(range(len(spec.blocks)))
    fig = make_subplots(rows=1, cols=3, subplot_titles=("q/k kept per head", "v kept per head", "FFN kept"))
    for col, idx in enumerate((0, 1, 2), start=1):
        if cdcp_widths is not None:
            fig.add_bar(x=blocks, y=[w[idx] for w in cdcp_widths], name="CDCP", marker_color="#1f77b4",
                        showlegend=col == 1, row=1, col=col)
        fig.add_bar(x=blocks, y=[w[idx] for w in global_widths], name="global selection (deployable)",
                    marker_color="#ff7f0e", showlegend=col == 1, row=1, col=col)
    fig.update_layout(barmode="group", height=380, title=title, legend=dict(orientation="h", y=-0.2),
                      margin=dict(t=70, l=40, r=20, b=40))
    return fig
