"""The Cost tab's answer: FLOPs, parameters, measured throughput and held-out top-1 of the original, its CAIT twin
and the ToMe baseline at the twin's FLOPs, measured in one run on this device (docs/method.md: FLOPs)."""
from __future__ import annotations

import time
from collections.abc import Callable

import pandas as pd
import plotly.graph_objects as go

from ..data.datasets import build_datasets
from ..data.synthetic import CLASSES
from ..measure.accuracy import evaluate
from ..measure.flops import count_params
from ..measure.precision import check_precision
from ..measure.speed import least_timing, throughput_and_latency
from ..viz.charts import block_flops_figure, cost_table, throughput_figure
from .pairs import ModelPair
from .public import Limits
from .status import model_labels


def cost_view(pair: ModelPair, limits: Limits, measure: bool = False, batch_size: int = 8, iters: int = 2,
              held_out: int = 200, progress: Callable[[float, str], None] | None = None, precision: str = "fp32",
              rounds: int = 5, started: float | None = None) -> tuple[pd.DataFrame, go.Figure, go.Figure | None]:
    """FLOPs, params, throughput (images/s at ``batch_size``) and latency at batch 1 (ms), when ``measure``, and, for
    models trained on the synthetic shapes,
    held-out top-1 of the original, its twin and ToMe at the twin's FLOPs; FLOPs per block of the three; and the
    throughput of each with its spread (None when not measured).

    Args:
        pair: the models.
        limits: caps on the batch size (public mode).
        measure: time the three models (alternately, same input) on the pair's device, at ``batch_size`` and at 1.
        batch_size: images per timed batch.
        iters, rounds: timed batches per model per round, and alternation rounds (each figure is the median over
            the rounds with the lowest and highest round beside it).
        held_out: images of the synthetic held-out split to score top-1 on, when the models know its classes.
        progress: called as ``progress(fraction, message)`` while measuring.
        precision: what the three models compute in (:mod:`cait.measure.precision`: ``fp32``, ``bf16``,
            ``bf16-autocast``, ``int8``); in any but fp32 the fp32 original is timed too, as the first row, so every
            speed-up is against the fp32 original measured in the same run.
        started: ``time.perf_counter()`` when the request began (before its pair was built): the time already
            spent comes off the budget, so the budget bounds the whole request.

    The timing starts no round that would end past :meth:`cait.studio.public.Limits.measure_budget` seconds (30 in
    public mode, 90 locally) from ``started``; the table's *rounds* says how many were timed.

    In public mode a combination whose timing cannot fit that budget even with one round (predicted from one timed
    small batch per model, :func:`cait.measure.speed.least_timing`) is refused up front, with the largest batch
    size that fits: one DeiT-B call in int8 at batch 32 once held the compute slot for 262 s.

    Raises:
        ValueError: for a batch size outside what these limits allow or beyond the time budget, or a precision this
            device cannot run (the message names the field).
    """
    check_precision(precision, pair.device)
    cap = limits.cost_batch_cap()
    if measure and not 1 <= int(batch_size) <= cap:
        raise ValueError(f"Batch size: {batch_size} is outside 1 to {cap}"
                         + (" on this public Space" if limits.public else ""))
    f = pair.flops()
    models, rows = _entries(pair, precision)
    started = time.perf_counter() if started is None else started
    if measure and limits.public:                                    # the whole timing within the budget, or refused
        left = limits.measure_budget() - (time.perf_counter() - started)
        _check_budget(models, int(batch_size), pair, left, precision, limits.measure_budget())
    if measure:
        # Batch 1 too, where token merging's matching costs more than its FLOPs (Dense transfer, item 7). The timing
        # is boxed: no round starts that would end past the budget, and the table says how many rounds were timed.
        left = limits.measure_budget() - (time.perf_counter() - started)
        speed = throughput_and_latency(models, int(batch_size), pair.device, iters=1 if limits.public else iters,
                                       rounds=rounds, progress=progress, budget_s=max(0.0, left))
        for k in rows:
            rows[k].update(speed[k])
    scored = _score(pair, models, rows, held_out)
    table = cost_table(rows, held_out if scored else None)
    table.insert(1, "device", str(pair.device))
    table.insert(2, "precision", ["fp32" if label == "original (fp32)" else precision for label in rows])
    blocks = block_flops_figure(f["original"], f["compressed"], **{"ToMe (baseline)": f["tome"]})
    return table, blocks, throughput_figure(rows) if measure else None


def _score(pair: ModelPair, models: dict, rows: dict, held_out: int) -> bool:
    """Held-out top-1 of each model into ``rows`` when the models know the synthetic classes; whether it did."""
    if model_labels(pair.original) != list(CLASSES) or held_out <= 0:
        return False
    _, val, _ = build_datasets("synthetic", int(pair.original.patch_embed.img_size[0]), val_size=held_out)
    for k, m in models.items():
        rows[k]["top1"] = evaluate(m, val, pair.device)
    return True


def _entries(pair: ModelPair, precision: str) -> tuple[dict, dict]:
    """The rows' models in ``precision`` (row label → runnable; the fp32 original first in another precision) and
    their FLOPs and parameters (row label → dict)."""
    f = pair.flops()
    base = {"original": pair.original, "CAIT twin": pair.compressed, "ToMe (baseline)": pair.tome()}
    flops = {"original": sum(f["original"].values()), "CAIT twin": sum(f["compressed"].values()),
             "ToMe (baseline)": sum(f["tome"].values())}
    tag = "" if precision == "fp32" else f" ({precision})"
    entries = [] if precision == "fp32" else [("original (fp32)", "original", pair.original)]
    entries += [(k + tag, k, pair.in_precision(k, precision)) for k in base]           # (row, model, runnable)
    models = {label: m for label, _, m in entries}
    return models, {label: {"flops": flops[key], "params": count_params(base[key])} for label, key, _ in entries}


def _check_budget(models: dict, batch_size: int, pair: ModelPair, budget: float, precision: str, total: float
                  ) -> None:
    """Refuse (ValueError naming the field) a timing that needs more than the ``budget`` seconds left of the
    request's ``total`` at the least."""
    cost = least_timing(models, batch_size, pair.device, budget_s=budget)
    need = cost.seconds(batch_size)
    if need <= budget:
        return
    fits = cost.largest_batch(budget)
    raise ValueError(f"Batch size: timing these {len(models)} models in {precision} at batch {batch_size} needs "
                     f"{'more than' if cost.partial else 'about'} {need:.0f} s on this Space, past the {budget:.0f} s left "
                     f"of its {total:.0f} s budget; " + (f"a batch of {'under' if cost.partial else 'at most'} {fits} fits" if fits >= 1
                                   else "try a smaller model" + (" or fp32" if precision != "fp32" else "")))
