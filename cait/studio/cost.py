"""The Cost tab's answer: FLOPs, parameters, measured throughput and held-out top-1 of the original, its CAIT twin
and the ToMe baseline at the twin's FLOPs, measured in one run on this device (SPEC §4)."""
from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import plotly.graph_objects as go

from ..baselines.tome import tome_flops
from ..data.datasets import build_datasets
from ..data.synthetic import CLASSES
from ..measure.accuracy import evaluate
from ..measure.flops import count_params
from ..measure.precision import check_precision
from ..measure.speed import throughput_and_latency
from ..viz.charts import block_flops_figure, cost_table
from .pairs import ModelPair
from .public import Limits
from .status import model_labels


def cost_view(pair: ModelPair, limits: Limits, measure: bool = False, batch_size: int = 8, iters: int = 3,
              held_out: int = 200, progress: Callable[[float, str], None] | None = None, precision: str = "fp32"
              ) -> tuple[pd.DataFrame, go.Figure]:
    """FLOPs, params, throughput (images/s at ``batch_size``) and latency at batch 1 (ms), when ``measure``, and, for
    models trained on the synthetic shapes,
    held-out top-1 of the original, its twin and ToMe at the twin's FLOPs; and FLOPs per block.

    Args:
        pair: the models.
        limits: caps on the batch size (public mode).
        measure: time the three models (alternately, same input) on the pair's device, at ``batch_size`` and at 1.
        batch_size: images per timed batch.
        iters: timed batches per model per round.
        held_out: images of the synthetic held-out split to score top-1 on, when the models know its classes.
        progress: called as ``progress(fraction, message)`` while measuring.
        precision: what the three models compute in (:mod:`cait.measure.precision`: ``fp32``, ``bf16``,
            ``bf16-autocast``, ``int8``); in any but fp32 the fp32 original is timed too, as the first row, so every
            speed-up is against the fp32 original measured in the same run.

    In public mode the timing stops starting new rounds after ``limits.max_measure_seconds``
    (:meth:`cait.studio.public.Limits.measure_budget`); the table's *timed batches* says how many were timed.

    Raises:
        ValueError: for a batch size outside what these limits allow, or a precision this device cannot run (the
            message names the field).
    """
    check_precision(precision, pair.device)
    cap = limits.cost_batch_cap()
    if measure and not 1 <= int(batch_size) <= cap:
        raise ValueError(f"Batch size: {batch_size} is outside 1 to {cap}"
                         + (" on this public Space" if limits.public else ""))
    f = pair.flops()
    base = {"original": pair.original, "CAIT twin": pair.compressed, "ToMe (baseline)": pair.tome()}
    flops = {"original": sum(f["original"].values()), "CAIT twin": sum(f["compressed"].values()),
             "ToMe (baseline)": tome_flops(base["ToMe (baseline)"])}
    tag = "" if precision == "fp32" else f" ({precision})"
    entries = [] if precision == "fp32" else [("original (fp32)", "original", pair.original)]
    entries += [(k + tag, k, pair.in_precision(k, precision)) for k in base]           # (row, model, runnable)
    models = {label: m for label, _, m in entries}
    rows = {label: {"flops": flops[key], "params": count_params(base[key])} for label, key, _ in entries}
    if measure:
        # Batch 1 too, where token merging's matching costs more than its FLOPs (Dense transfer, item 7). On a public
        # Space the timing is boxed: short rounds, none started past the budget (what was timed is said).
        budget = limits.measure_budget()
        boxed = budget is not None
        speed = throughput_and_latency(models, int(batch_size), pair.device, iters=1 if boxed else iters,
                                       rounds=3 * iters if boxed else 2, progress=progress, budget_s=budget)
        for k in rows:
            rows[k]["images_per_s"] = speed[k]["images_per_s"]
            rows[k]["latency_ms"] = speed[k]["latency_ms"]
    if model_labels(pair.original) == list(CLASSES) and held_out > 0:
        _, val, _ = build_datasets("synthetic", int(pair.original.patch_embed.img_size[0]), val_size=held_out)
        for k, m in models.items():
            rows[k]["top1"] = evaluate(m, val, pair.device)
    table = cost_table(rows)
    table.insert(1, "device", str(pair.device))
    table.insert(2, "precision", ["fp32" if label == "original (fp32)" else precision for label in rows])
    if measure:
        table["timed batches"] = [speed[k]["timed_batches"] for k in rows]
    return table, block_flops_figure(f["original"], f["compressed"])
