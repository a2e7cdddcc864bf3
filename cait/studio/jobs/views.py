"""What the Fine-tune and Compactors tabs show: the jobs table, one job's progress and curves, a fine-tune's time
estimate on this device, and a run's compactors against plain global selection.

Plain functions over a :class:`cait.studio.jobs.manager.JobManager`, returning Markdown, pandas tables and plotly
figures, so they are testable without a browser. On a public Space (:mod:`cait.studio.public`) another visitor's job
shows no paths or logs.
"""
from __future__ import annotations

import copy
import functools
import json
import time
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F

from ...compress.oneshot import compress
from ...compress.plan import split_budget
from ...compress.select import global_selection
from ...data.synthetic import SyntheticShapes
from ...finetune.engine import soft_distillation
from ...finetune.records import EvalRecord, FinalRecord, StartRecord, of_type
from ...finetune.rundir import RunDirError, compactor_snapshot
from ...io.bundled import ORIGINAL_DIR
from ...io.checkpoint import atomic_write, build_skeleton, load_checkpoint, read_config
from ...measure.precision import cpu_has_bf16_units
from ...models.atme import apply_atme
from ...models.compactors import add_compactors
from ...models.deit import create_model
from ...models.spec import describe
from ...viz.charts import (channels_figure, compactor_figure, consistency_figure, segmentation_figure,
                           training_figure)
from .manager import JobManager
from .model import JobStatus
from .process import hide_paths


def _fmt_s(seconds: float | None) -> str:
    """``"01:02:03"``, with whole days in front past 24 h (``"3 d 01:02:03"``); ``"–"`` for None."""
    if seconds is None:
        return "–"
    days, rest = divmod(int(max(0, seconds)), 86400)
    clock = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days} d {clock}" if days else clock


def _sees_details(jobs: JobManager, job, viewer: str | None) -> bool:
    """Locally everyone; on a public Space only the session that started the job (paths, log tails)."""
    return not jobs.limits.public or (viewer is not None and job.owner == viewer)


def jobs_table(jobs: JobManager, viewer: str | None = None, limit: int = 50) -> pd.DataFrame:
    """One row per job, newest first (at most ``limit``): id, task (fine-tune or segmentation), status, model (a
    segmentation's backbone), data, FLOPs target, step, device, message. In public mode another visitor's job shows
    no data path and no message."""
    rows = []
    for j in jobs.list(limit=limit):
        p = jobs.progress(j.id)
        mine = _sees_details(jobs, j, viewer)
        model = j.model_label()
        rows.append({"job": j.id, "task": j.engine.noun, "status": j.status.value,
                     "model": "bundled DeiT-Tiny" if model.endswith(ORIGINAL_DIR) else model,
                     "data": j.data_label() if mine or j.data_label() == "synthetic" else "(not shown)",
                     "FLOPs reduction": j.args.get("flops_reduction") if j.kind == "finetune"
                     or j.args.get("baseline") not in (None, "none") else None, "step": f"{p.step}/{p.steps}",
                     "device": j.device, "message": j.message.splitlines()[0] if j.message and mine else ""})
    return pd.DataFrame(rows, columns=["job", "task", "status", "model", "data", "FLOPs reduction", "step", "device",
                                       "message"])


def job_view(jobs: JobManager, job_id: str, viewer: str | None = None) -> tuple[str, go.Figure]:
    """Markdown status (step, loss, |S|, images/s, elapsed, ETA, message with log tail) and the live curves.

    Raises:
        KeyError: unknown or malformed job id.
    """
    p = jobs.progress(job_id)
    job = p.job
    lines = [f"**{job.engine.noun.capitalize()} job `{job.id}`** — **{job.status}** on `{job.device}` · "
             f"step {p.step}/{p.steps}"
             + (f" · loss {p.loss:.3f}" if p.loss is not None else "")
             + _pruning_text(job, p.records, p.s_size)
             + (f" · {p.images_per_s:.0f} images/s" if p.images_per_s else "")
             + f" · elapsed {_fmt_s(p.elapsed_s)} · ETA {_fmt_s(p.eta_s)}"]
    held_out = _held_out_text(p.records)
    if held_out:
        lines.append(held_out)
    if job.status == JobStatus.QUEUED:
        lines.append("Waiting for its device to be free (one job per device).")
    if job.message and _sees_details(jobs, job, viewer):
        lines.append("```\n" + job.message + "\n```")
    figure = segmentation_figure if job.kind == "segment" else training_figure
    return "\n\n".join(lines), figure(p.records)


def _pruning_text(job, records: list, s_size: int) -> str:
    """`` · |S| 12`` for a fine-tune, or what a calibrated start pruned instead (its S stays empty by design)."""
    if job.kind != "finetune":
        return ""
    start = next(iter(of_type(records, StartRecord)), None)
    if start is not None and start.pruned_before_training():
        return (f" · pruned before training (calibrated twin, {start.target_flops / 1e9:.3f} of "
                f"{start.base_flops / 1e9:.3f} GFLOPs; no compactors, |S| stays 0)")
    return f" · |S| {s_size}"


def _held_out_text(records: list) -> str:
    """The newest held-out scores in words (the final record once the run has one), with their n: top-1 and,
    label-free, the agreement with the teacher."""
    scored = [r for r in records if isinstance(r, (EvalRecord, FinalRecord))]
    start = next(iter(of_type(records, StartRecord)), None)
    if not scored:
        return ""
    e = scored[-1]
    n = getattr(e, "held_out", None) or (start and start.config.get("val_size"))
    parts = [f"top-1 {e.top1_student:.1f}%" + ("" if e.top1_teacher is None else f" (teacher {e.top1_teacher:.1f}%)")
             ] if e.top1_student is not None else []
    if e.agreement is not None:
        parts.append(f"agreement with the teacher {e.agreement:.1f}%"
                     + ("" if e.kl is None else f", KL {e.kl:.3f} nats"))
    return (f"Held-out at step {e.step}" + (f" (n = {n})" if n else "") + ": " + ", ".join(parts) + "."
            if parts else "")


@functools.lru_cache(maxsize=16)
def _step_seconds(model: str, batch_size: int, flops_reduction: float, device: str, label_free: bool = False
                  ) -> float:
    """Seconds of one training step as the engine runs it (teacher forward for its targets, synthetic batch
    rendered), measured once per setting: one warm-up step, then one timed. Labelled: the student with ATME and
    compactors, hard distillation. Label-free: the calibrated twin's structure (CDCP only with widths in multiples of
    8, as the app's label-free job; :func:`cait.compress.compress` without calibration: the same FLOPs), soft targets,
    bf16 autocast on the CPU where it has bf16 units."""
    teacher = (load_checkpoint(model) if Path(model).is_dir() else create_model(model, pretrained=False)[0]).eval()
    split = split_budget(teacher, flops_reduction)
    if label_free:                                   # as the app's label-free job: CDCP only, widths ×8
        student = compress(teacher, flops_reduction, layout="none", round_to=8)
    else:
        student = apply_atme(copy.deepcopy(teacher), split.layout)
        if split.target_flops < describe(student).flops():
            add_compactors(student)
    teacher, student = teacher.to(device), student.to(device).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    ds = SyntheticShapes(batch_size, int(teacher.patch_embed.img_size[0]))
    bf16 = label_free and torch.device(device).type == "cpu" and cpu_has_bf16_units()   # as the job will run
    seconds = 0.0
    for i in range(2):
        t0 = time.perf_counter()
        x = torch.stack([ds[j][0] for j in range(batch_size)]).to(device)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                target = teacher(x)
            out = student(x)
        loss = soft_distillation(out, target) if label_free else F.cross_entropy(out, target.argmax(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds = time.perf_counter() - t0
    return seconds


def step_seconds(model: str, batch_size: int, flops_reduction: float, device: str, cache: Path | None = None,
                 measure_batch: int | None = None, label_free: bool = False, cached_only: bool = False
                 ) -> tuple[float, int]:
    """Seconds of one training step of ``batch_size`` images, and the batch actually timed.

    With ``measure_batch`` (public mode) at most that many images are timed and the time is scaled linearly to
    ``batch_size``: on the 2-core CI CPU, DeiT-S at 50% took 20.0 s for a step of 64 images, and 2.41 s for 8 (19.3 s
    scaled), so the scaled figure is close but can be a little low. With ``cache`` (a JSON file) each setting is
    timed once per server, across restarts. ``label_free``: the step of a label-free job (:func:`_step_seconds`).

    Raises:
        LookupError: with ``cached_only``, when this setting has not been timed yet (nothing is timed then).
    """
    timed = batch_size if measure_batch is None else max(2, min(batch_size, measure_batch) // 2 * 2)
    key = json.dumps([model, batch_size, timed, flops_reduction, device] + (["label-free"] if label_free else []))
    known = _read_cache(cache)
    if key in known:
        return float(known[key]), timed
    if cached_only:
        raise LookupError("this setting has not been timed on this server yet")
    seconds = _step_seconds(model, timed, flops_reduction, device, label_free) * batch_size / timed
    if cache is not None:
        known = _read_cache(cache) | {key: seconds}             # another request may have added one meanwhile
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda f: Path(f).write_text(json.dumps(known, indent=1)))
    return seconds, timed


def _read_cache(cache: Path | None) -> dict:
    try:
        known = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    except (OSError, ValueError):
        return {}                                                # a damaged cache is only re-measured
    return known if isinstance(known, dict) else {}


def finetune_estimate(model: str, steps: int, batch_size: int, flops_reduction: float, device: str,
                      val_size: int = 512, evals: int = 5, cache: Path | None = None,
                      measure_batch: int | None = None, calibrate: int = 0, cached_only: bool = False) -> str:
    """Markdown: how long a fine-tune would take on this device, from a training step measured here
    (:func:`step_seconds`: cached per model, batch, reduction, device and kind; on a public Space timed on at most
    ``measure_batch`` images, so an estimate takes seconds, not minutes).

    Args:
        calibrate: 0 for a labelled job (CDCP's compactors, hard distillation); N for a label-free one that starts
            from the twin calibrated on N images (``--calibrate N``, bf16 autocast on the CPU): its step is timed as
            that job runs it, and the calibration counted as two passes over N images (Fisher scores, refit).
        cached_only: answer from the cache alone (as the form changes), never time a step.

    Raises:
        ValueError: for settings the engine would refuse (the message names the field).
        LookupError: with ``cached_only``, for a setting not timed yet.
    """
    if not isinstance(steps, int) or steps < 1 or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError("Steps and Batch size must be whole numbers (at least 1 and 2)")
    per_step, timed = step_seconds(model, batch_size, round(float(flops_reduction), 2), device, cache, measure_batch,
                                   label_free=calibrate > 0, cached_only=cached_only)
    per_image = per_step / batch_size
    eval_s = per_image / 3 * val_size * evals                      # a forward is about a third of a training step
    calibrate_s = 2 * per_image * calibrate
    total = steps * per_step + eval_s + calibrate_s
    how = "measured on this server" if timed == batch_size else f"scaled from a step of {timed} images timed here"
    bf16_text = " in bf16" if device == "cpu" and cpu_has_bf16_units() else ""
    kind = (f"a label-free step{bf16_text} from the calibrated twin" if calibrate
            else "a step with CDCP's compactors")
    extra = f", and calibrating the twin on {calibrate} images first" if calibrate else ""
    return (f"**Estimated time on this `{device}`:** about {_fmt_s(total)} ({per_step:.2f} s per step of {batch_size} "
            f"images, {how}: {kind}; plus {evals} evaluations of {val_size} images{extra}). Other jobs or visitors "
            "on this machine slow it down.")


def _calibrated_view(job_id: str, run: Path) -> tuple[str, go.Figure, None]:
    """What a job that started from a calibrated twin pruned: its kept channels per block against the original's,
    read from the run's ``calibrated/`` and ``teacher/`` configs (no weights are loaded)."""
    try:
        twin, teacher = (build_skeleton(read_config(run / d)) for d in ("calibrated", "teacher"))
    except (OSError, ValueError, KeyError):
        raise ValueError(f"Job {job_id}: its calibrated start is not written yet") from None
    t, o = describe(twin), describe(teacher)
    removed = sum(b.heads * (b.qk_dim + b.v_dim) + b.ffn_dim for b in o.blocks) - \
        sum(b.heads * (b.qk_dim + b.v_dim) + b.ffn_dim for b in t.blocks)
    text = (f"**Job `{job_id}` started from a calibrated twin:** its channels were chosen before training (by "
            f"Fisher information or weight norm, whichever kept the original's predictions better on held-out "
            f"images) and removed, {removed} q/k, v and FFN channels in all ({o.flops() / 1e9:.4f} → "
            f"{t.flops() / 1e9:.4f} GFLOPs). It then distills the twin as it is, so it trains **no compactors**: "
            "there are no compactor row norms to show and S stays empty. The chart shows what it kept per block.")
    return text, channels_figure(o, t, title=f"Job {job_id}: retained channels per block (calibrated start)"), None


def compactor_view(jobs: JobManager, job_id: str, viewer: str | None = None
                   ) -> tuple[str, go.Figure, go.Figure | None]:
    """Compactor heatmaps of a job's newest state, and CDCP against plain global selection at the same FLOPs; for a
    job that started from a calibrated twin (no compactors), the channels it kept per block instead (and None).

    Raises:
        ValueError: if the job has written no training state yet (the message names the job, never a path), or, in
            public mode, it trained on another visitor's upload (:meth:`JobManager.visible` to session ``viewer``).
    """
    if not jobs.visible(jobs.get(job_id), viewer):
        raise ValueError(f"Job {job_id}: trained on another visitor's upload; only that visitor sees what it learned")
    run = jobs.run_dir(job_id)
    start = next(iter(of_type(jobs.records(job_id), StartRecord)), None)
    if start is not None and start.pruned_before_training():
        return _calibrated_view(job_id, run)
    try:
        snap = compactor_snapshot(run)
    except (RunDirError, KeyError) as e:
        raise ValueError(f"Job {job_id}: " + hide_paths(str(e)).split(": ", 1)[-1]) from None
    g = global_selection(snap.scores, snap.spec, snap.target_flops)
    g_flops = snap.spec.with_widths(g.widths).flops()
    cdcp_widths = snap.mask.widths() if snap.mask is not None else None
    near_zero = sum(int((t < 1e-2).sum()) for t in snap.scores.q + snap.scores.k + snap.scores.v + snap.scores.ffn)
    text = [f"**Job `{job_id}`, training state of step {snap.step}.** FLOPs target {snap.target_flops / 1e9:.4f} G. "
            f"Near-zero compactor rows (‖Q_j‖ < 0.01): {near_zero}."]
    if cdcp_widths is not None:
        m = snap.mask
        rows = 2 * sum(int(t.sum()) for t in m.qk) + sum(int(t.sum()) for t in m.v + m.ffn)
        text.append(f"**CDCP** (S: {m.size()} units = {rows} compactor rows, since a q/k unit is a pair of rows, "
                    f"one in q and one in k): every head of a block keeps the same widths, so all of S can go: "
                    f"{snap.spec.with_widths(cdcp_widths).flops() / 1e9:.4f} G.")
    text.append(f"**Plain global selection** at the same nominal FLOPs selects channels head by head and q apart "
                f"from k; a batched attention can only drop q/k channels selected in both, down to the head that "
                f"keeps most: it deploys at {g_flops / 1e9:.4f} G "
                f"({100 * (g_flops / snap.target_flops - 1):+.1f}% against the target).")
    if cdcp_widths is not None and cdcp_widths == g.widths:
        text.append("*Here the two deploy the same widths:* the compactor norms are still so uniform (or S so small) "
                    "that the channels global selection picks happen to line up across heads and between q and k; "
                    "the difference appears as the masked rows shrink (compare a later training state).")
    elif cdcp_widths is None:
        text.append("*No CDCP selection yet* (the warm-up comes first): the chart shows global selection alone.")
    return ("\n\n".join(text), compactor_figure(snap.scores, snap.mask, f"Compactors at step {snap.step}"),
            consistency_figure(snap.spec, cdcp_widths, g.widths, "Kept per block: CDCP vs global selection"))
