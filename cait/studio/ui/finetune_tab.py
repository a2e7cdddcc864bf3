"""The Fine-tune tab: start ``python -m cait.finetune`` as a background job, estimate its time, follow its live
curves, cancel it, and compare its model in the other tabs; a page reload brings the jobs back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ...measure.precision import cpu_has_bf16_units
from ...models.deit import TEST_MODEL, missing_weights_reason
from ..catalogue import ModelRef
from ..engine import Studio
from ..jobs.manager import JobManager
from ..jobs.model import JobError
from ..jobs.views import finetune_estimate, job_view, jobs_table
from ..public import ArchiveError, on_space
from . import segment_job
from .common import COMPUTE, heavy, live_intervals, refusal, refusing, visitor, whole
from .model_bar import ModelBar

BUNDLED_FINETUNE = {"bundled DeiT-Tiny (trained here on synthetic shapes, 224 px) → its CAIT twin": "bundled"}
"""The default fine-tune: what the app shows offline, compressed by the engine."""
FINETUNE_MODELS = {f"tiny test DeiT (32 px, {TEST_MODEL}): about a minute on a CPU": TEST_MODEL,
                   "DeiT-Tiny (224 px)": "deit_tiny_patch16_224", "DeiT-Small (224 px)": "deit_small_patch16_224",
                   "DeiT-Base (224 px)": "deit_base_patch16_224"}
TARGETS = {"the data's labels": "data",
           "the original's predictions (no labels needed)": "none"}
"""What the student learns from: labels (with hard distillation), or the original alone (``--labels none``)."""
LABEL_FREE = dict(labels="none", merge="none", token_distill=1.0, token_distill_blocks="all", calibrate=128, mixup=0.0,
                  cutmix=0.0, lr=3e-5, min_lr=3e-6, round_to=8, val_size=256)
"""A label-free job: the calibrated twin learns the original's soft outputs and its tokens pooled onto the merged
grid at every block, on clean images (Mixup/CutMix cost agreement here), gently: LR 3e-5 after a 5% warm-up, cosine
to 3e-6 (at 1.5e-4 a pilot fell from 85.0 to 82.0% top-1 in 30 steps; at 3e-5 the bundled DeiT-Tiny's CDCP-only twin
held its calibrated start and reached 90.0% top-1, 94.6% agreement at step 500, docs/experiments.md); kept
widths in multiples of 8 (faster on CPUs at equal FLOPs); agreement measured on 256 held-out images. CDCP only, no
merges (the measured planner's choice at 50%): with this recipe the bundled DeiT-Tiny's twin at step 250 held 89.6%
top-1 (93.9% agreement) from CDCP only and 69.4% (69.1%) from ATME ``h5,v10``; the paper's plan starts near 50%."""


@dataclass
class FinetuneTab:
    """What other parts of the page need: the selected job, and the page-load event that restores the tab."""

    job: gr.Dropdown
    on_load: object
    load_outputs: list


def _intro(jobs: JobManager) -> str:
    public = jobs.limits.public
    where = ("On this public Space the runs directory is not shown; finished jobs are deleted after "
             f"{jobs.limits.retention_s / 3600:g} h." if public else
             f"Jobs and their checkpoints live in `{jobs.root}` and survive an app restart."
             + (" **On this Space that disk is ephemeral**: set `CAIT_RUNS_DIR` to persistent storage (e.g. a mounted "
                "bucket) to keep them." if on_space() and not str(jobs.root).startswith("/data") else ""))
    return ("Each fine-tune runs `python -m cait.finetune` as its own process (a crash or a cancel never takes the app "
            "down); one job per device, the others queue. " + where)


@dataclass
class _Widgets:
    ft_model: gr.Dropdown
    targets: gr.Dropdown
    data: gr.Textbox
    archive: gr.File
    reduction: gr.Slider
    steps: gr.Number
    batch: gr.Number
    calibrate: gr.Number
    held_out: gr.Number
    device: gr.Dropdown
    estimate: gr.Button
    start: gr.Button
    estimated: gr.Markdown
    started: gr.Textbox
    job: gr.Dropdown
    cancel: gr.Button
    use: gr.Button
    job_status: gr.Markdown
    cancelled: gr.Markdown
    curves: gr.Plot
    table: gr.Dataframe
    segment: segment_job.SegmentJobWidgets


def _layout(studio: Studio, models: dict[str, str], devices: list[str], job_ids: list[str]) -> _Widgets:
    """The tab's widgets, top to bottom."""
    jobs = studio.jobs
    public = jobs.limits.public
    with gr.Row():
        ft_model = gr.Dropdown(list(models), value=next(iter(models)), label="Model", elem_id="ft-model",
                               info="the default compresses the bundled DeiT-Tiny into its CAIT twin")
        targets = gr.Dropdown(list(TARGETS), value=next(iter(TARGETS)), label="Targets", elem_id="ft-targets",
                              info="without labels the twin learns from the original's outputs and tokens")
        data = gr.Textbox("synthetic", label="Data", elem_id="ft-data",
                          info="'synthetic' (or empty), 'photos' (bundled photos, random crops; no labels), or "
                               "upload a .zip of train/CLASS/ and val/CLASS/ images (no labels: any folders)" if public
                          else "'synthetic' (or empty), 'photos' (no labels), an ImageFolder path on the server (no "
                               "labels: any folder of images), or hf:NAME[:CONFIG][@SPLIT]")
        archive = gr.File(label="…or an ImageFolder .zip (train/ and val/)", file_types=[".zip"], type="filepath",
                          height=100)
        reduction = gr.Slider(0.0, 0.8, value=0.5, step=0.01, label="Total FLOPs reduction")
    with gr.Row():
        # No widget bounds: the server checks every field and names it in the error (cait.studio.jobs.validate).
        # Defaults that finish in minutes where the job runs: on a 2-core CPU a step of 16 images of the bundled
        # DeiT-Tiny takes ~1.5-3 s (100 steps: a few minutes); a GPU takes the usual batch.
        on_gpu = devices[0] == "cuda"
        steps = gr.Number(300 if on_gpu else 100, precision=None, label="Steps",
                          info=f"1 to {jobs.limits.steps_cap():,}", elem_id="ft-steps")
        batch = gr.Number(64 if on_gpu else 16, precision=None, label="Batch size (even)",
                          info=f"2 to {jobs.limits.batch_cap():,}")
        calibrate = gr.Number(LABEL_FREE["calibrate"], precision=None, label="Calibration images (label-free)",
                              info="unlabelled images the starting twin is calibrated on", elem_id="ft-calibrate")
        held_out = gr.Number(LABEL_FREE["val_size"], precision=None, label="Held-out images (label-free)",
                             info="agreement with the original is measured on these", elem_id="ft-held-out")
        device = gr.Dropdown(devices, value=devices[0], label="Device")
        estimate = gr.Button("Estimate time")
        start = gr.Button("Start fine-tune", variant="primary")
    estimated = gr.Markdown(elem_id="ft-estimate")
    segment = segment_job.layout(studio, devices)
    started = gr.Textbox(label="Started job", interactive=False)
    with gr.Row():
        job = gr.Dropdown(job_ids, value=(job_ids or [None])[0], label="Job", allow_custom_value=True, elem_id="job")
        cancel = gr.Button("Cancel job", variant="stop")
        use = gr.Button("Compare its model in the other tabs")
    return _Widgets(ft_model, targets, data, archive, reduction, steps, batch, calibrate, held_out, device, estimate,
                    start, estimated,
                    started, job, cancel, use, job_status=gr.Markdown(elem_id="job-status"), cancelled=gr.Markdown(),
                    curves=gr.Plot(label="Live training curves", elem_id="curves"),
                    table=gr.Dataframe(jobs_table(jobs), label="Jobs (newest first)", interactive=False),
                    segment=segment)


class _Handlers:
    """The tab's event handlers; every refusal names the field, in public mode no path or traceback."""

    def __init__(self, studio: Studio, models: dict[str, str]) -> None:
        self.studio, self.jobs, self.models = studio, studio.jobs, models

    def job_ids(self) -> list[str]:
        return [j.id for j in self.jobs.list(limit=50)]

    def on_load(self, request: gr.Request):
        ids = self.job_ids()
        owner = visitor(request)[0]
        return (gr.update(choices=ids, value=ids[0] if ids else None), jobs_table(self.jobs, owner),
                gr.update(choices=self.studio.catalogue.choices(owner)))

    def _estimate(self, ft_model, reduction, n_steps, batch_size, on_device, targets, cached_only: bool) -> str:
        if targets not in TARGETS:
            raise ValueError(f"Targets: choose one of {', '.join(TARGETS)}")
        label_free = TARGETS[targets] == "none"
        args = self.jobs.validate(dict(model=self.models.get(ft_model, ft_model), steps=whole(n_steps, "steps"),
                                       batch_size=whole(batch_size, "batch_size"), flops_reduction=float(reduction)))
        return finetune_estimate(args["model"], args["steps"], args["batch_size"], args["flops_reduction"],
                                 on_device, cache=self.jobs.root / "cache" / "step_times.json",
                                 measure_batch=self.jobs.limits.estimate_batch_cap(),
                                 val_size=LABEL_FREE["val_size"] if label_free else 512,
                                 calibrate=LABEL_FREE["calibrate"] if label_free else 0, cached_only=cached_only)

    def on_estimate(self, ft_model, reduction, n_steps, batch_size, on_device, targets, request: gr.Request):
        with refusing(ValueError, JobError):
            return self._estimate(ft_model, reduction, n_steps, batch_size, on_device, targets, cached_only=False)

    def on_form(self, ft_model, reduction, n_steps, batch_size, on_device, targets, request: gr.Request) -> str:
        """The estimate as the form changes, from the step times already measured on this server (instant); a
        setting not timed yet asks for *Estimate time*, a field the job would refuse is named."""
        try:
            return self._estimate(ft_model, reduction, n_steps, batch_size, on_device, targets, cached_only=True)
        except LookupError:
            return ("**Estimated time:** this setting has not been timed on this server yet: press *Estimate time* "
                    "(it times one training step here, once per setting).")
        except (ValueError, JobError) as e:
            return f"**Estimated time:** not yet — {e}"

    def on_start(self, ft_model, targets, data_text, archive_file, reduction, n_steps, batch_size, on_device,
                 calibrate=LABEL_FREE["calibrate"], held_out=LABEL_FREE["val_size"], request: gr.Request = None):
        owner, address = visitor(request)
        with refusing(ValueError, ArchiveError, JobError):
            n_steps, batch_size = whole(n_steps, "steps"), whole(batch_size, "batch_size")
            if targets not in TARGETS:
                raise ValueError(f"Targets: choose one of {', '.join(TARGETS)}")
            args = dict(model=self.models.get(ft_model, ft_model), data=(data_text or "").strip() or "synthetic",
                        flops_reduction=float(reduction), steps=n_steps, batch_size=batch_size,
                        **live_intervals(n_steps, evaluations=5))
            if TARGETS[targets] == "none":      # bf16 autocast on a CPU with bf16 units only (12x slower without)
                args.update(LABEL_FREE, cpu_bf16=on_device == "cpu" and cpu_has_bf16_units(),
                            calibrate=whole(calibrate, "calibrate"), val_size=whole(held_out, "val_size"))
                if not Path(args["model"]).is_dir() and args["model"] != "bundled":
                    args["pretrained"] = True   # a timm DeiT teaches with its ImageNet weights (the Hub or its cache)
                    why = missing_weights_reason(args["model"], self.studio.catalogue.hub_reason())
                    if why:                     # refused here, not 6 s into the job with a command-line hint
                        raise ValueError(f"Targets: the original's predictions teach only with trained weights, and "
                                         f"{why}; choose the bundled DeiT-Tiny or a finished job's model")
            if archive_file:                    # every field checked, then unpacked; a refusal leaves nothing
                new = self.jobs.submit_archive(archive_file, device=on_device, owner=owner, visitor=address, **args)
            else:
                new = self.jobs.submit(device=on_device, owner=owner, visitor=address, **args)
        return new.id, gr.update(choices=self.job_ids(), value=new.id), jobs_table(self.jobs, owner)

    def on_poll(self, job_id, request: gr.Request):
        owner = visitor(request)[0]
        table, choices = jobs_table(self.jobs, owner), gr.update(choices=self.studio.catalogue.choices(owner))
        backbones = gr.update(choices=segment_job.backbone_choices(self.studio, owner))
        if not job_id:
            return table, "No job selected.", None, choices, backbones
        with refusing(KeyError):
            text, fig = job_view(self.jobs, job_id, owner)
        return table, text, fig, choices, backbones

    def on_cancel(self, job_id, request: gr.Request):
        if not job_id:
            raise refusal("select a job first")
        with refusing(KeyError, JobError):
            return self.jobs.cancel(job_id, owner=visitor(request)[0])

    def on_use(self, job_id, request: gr.Request):
        with refusing(ValueError, KeyError):
            key = ModelRef.job(job_id).key
            if self.jobs.get(job_id).kind == "segment":
                raise ValueError(f"job {job_id} trains a segmenter: pick it in the Segmentation tab")
        choices = self.studio.catalogue.choices(visitor(request)[0])
        if key not in {k for _, k in choices}:
            raise refusal(f"job {job_id} has no finished model yet")
        return gr.update(choices=choices, value=key)


def build(studio: Studio, bar: ModelBar, poll_s: float) -> FinetuneTab:
    """The tab's widgets and handlers (inside ``gr.Tab``); the jobs table and curves refresh every ``poll_s``."""
    jobs = studio.jobs
    models = dict(BUNDLED_FINETUNE if studio.bundled is not None else {}, **FINETUNE_MODELS)
    models = {k: v for k, v in models.items() if not jobs.limits.public or v in jobs.limits.models}
    devices = ["cuda", "cpu"] if studio.device.type == "cuda" else ["cpu"]
    h = _Handlers(studio, models)
    gr.Markdown(_intro(jobs))
    w = _layout(studio, models, devices, h.job_ids())
    segment_job.wire(studio, w.segment, w.started, w.job, w.table, h.job_ids, jobs_table)
    poll_outputs = [w.table, w.job_status, w.curves, bar.model, w.segment.backbone]
    w.start.click(h.on_start, [w.ft_model, w.targets, w.data, w.archive, w.reduction, w.steps, w.batch, w.device,
                               w.calibrate, w.held_out],
                  [w.started, w.job, w.table], api_name="start_finetune", concurrency_limit=1, concurrency_id="jobs")
    w.estimate.click(heavy(studio.slot, h.on_estimate), [w.ft_model, w.reduction, w.steps, w.batch, w.device,
                                                         w.targets],
                     w.estimated, api_name="estimate_finetune", **COMPUTE)
    form = [w.ft_model, w.reduction, w.steps, w.batch, w.device, w.targets]
    for field in form:                                 # the estimate follows the form (cached step times only)
        field.change(h.on_form, form, w.estimated, api_visibility="private", trigger_mode="always_last")
    w.cancel.click(h.on_cancel, w.job, w.cancelled, api_name="cancel_finetune", concurrency_limit=1,
                   concurrency_id="jobs")
    w.use.click(h.on_use, w.job, bar.model, api_name="use_job_model")
    # Polls refresh quietly: no progress overlay, and none of the status tracker's untranslated "common.complete".
    gr.Timer(poll_s).tick(h.on_poll, w.job, poll_outputs, api_visibility="private", show_progress="hidden")
    w.job.change(h.on_poll, w.job, poll_outputs, api_name="job_status", show_progress="hidden")
    return FinetuneTab(w.job, h.on_load, [w.job, w.table, bar.model])
