"""The Fine-tune tab's segmentation part: start ``python -m cait.dense`` as a background job (a Semantic FPN probe
or an end-to-end run on the bundled pair, a DeiT or a finished fine-tune), followed in the same jobs table and
curves; a finished segmenter is shown in the Segmentation tab."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import gradio as gr

from ...io.bundled import bundled_pair
from ..engine import Studio
from ..jobs.model import JobError
from ..public import ArchiveError
from .common import live_intervals, refusing, visitor, whole

BASELINE_CHOICES = {"none (the backbone as it is)": "none", "ToMe, merges undone": "tome",
                    "token pruning (EViT), drops filled in": "token_pruning", "ATME alone (calibrated)": "atme",
                    "CDCP alone (calibrated)": "cdcp"}
END_TO_END_LR = 6e-5
"""The paper's ADE20K backbone LR (AdamW), used when "end to end" is ticked."""


@functools.cache
def _bundled_here() -> bool:
    """Whether this checkout has the bundled pair (read once: the page polls the backbone list every second)."""
    return bundled_pair() is not None


def backbone_choices(studio: Studio, viewer: str | None = None) -> list[tuple[str, str]]:
    """``(label, value)``: the bundled pair, the DeiTs this server allows, then finished fine-tunes ``viewer`` may
    build on."""
    out = []
    if _bundled_here():
        out += [("bundled DeiT-Tiny (original)", "bundled:original"), ("bundled CAIT twin", "bundled:cait")]
    limits = studio.limits
    out += [(m, m) for m in (limits.models if limits.public else limits.models + ("deit_base_patch16_224",))
            if m != "bundled"]
    out += [(f"fine-tune job {key[4:]}", key) for key in studio.jobs.job_models(viewer)]
    return out


@dataclass
class SegmentJobWidgets:
    backbone: gr.Dropdown
    baseline: gr.Dropdown
    reduction: gr.Slider
    data: gr.Textbox
    archive: gr.File
    steps: gr.Number
    batch: gr.Number
    end_to_end: gr.Checkbox
    device: gr.Dropdown
    start: gr.Button


def layout(studio: Studio, devices: list[str]) -> SegmentJobWidgets:
    """The accordion's widgets (inside the Fine-tune tab, under the fine-tune's own)."""
    limits = studio.limits
    choices = backbone_choices(studio)
    with gr.Accordion("Train a segmenter (Semantic FPN) as a background job", open=False):
        gr.Markdown("Runs `python -m cait.dense`: four blocks of the backbone feed a simple feature pyramid and a "
                    "Semantic FPN decoder, trained on the synthetic shapes' per-pixel masks or your folder "
                    "(`train|val/images` + `masks/`, PNG class indices, optional `classes.json`). Frozen backbone "
                    "(a probe) unless *end to end* is ticked. The finished segmenter appears in the Segmentation tab.")
        with gr.Row():
            backbone = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Backbone",
                                   elem_id="seg-backbone")
            baseline = gr.Dropdown(list(BASELINE_CHOICES), value=next(iter(BASELINE_CHOICES)), label="Baseline",
                                   info="made from an uncompressed backbone at the FLOPs reduction below")
            reduction = gr.Slider(0.0, 0.8, value=0.5, step=0.01, label="Baseline FLOPs reduction")
        with gr.Row():
            data = gr.Textbox("synthetic", label="Data", elem_id="seg-data",
                              info="'synthetic', or upload a .zip" + ("" if limits.public else ", or a server path"))
            archive = gr.File(label="…or a segmentation .zip (train/ and val/, images/ + masks/)",
                              file_types=[".zip"], type="filepath", height=100)
            steps = gr.Number(100, precision=None, label="Steps", info=f"1 to {limits.steps_cap():,}",
                              elem_id="seg-steps")
            batch = gr.Number(8, precision=None, label="Batch size", info=f"1 to {limits.batch_cap():,}")
            end_to_end = gr.Checkbox(False, label=f"End to end (backbone LR {END_TO_END_LR:g})")
            device = gr.Dropdown(devices, value=devices[0], label="Device")
            start = gr.Button("Start segmentation", variant="primary")
    return SegmentJobWidgets(backbone, baseline, reduction, data, archive, steps, batch, end_to_end, device, start)


def wire(studio: Studio, w: SegmentJobWidgets, started: gr.Textbox, job: gr.Dropdown, table: gr.Dataframe,
         job_ids, jobs_table) -> None:
    """The start handler: validate every field, then unpack an upload, then queue; a refusal removes what it
    unpacked. The started job joins ``job`` and ``table``."""
    jobs = studio.jobs

    def on_start(backbone_key, baseline_label, flops, data_text, archive_file, n_steps, batch_size, e2e, on_device,
                 request: gr.Request):
        owner, address = visitor(request)
        with refusing(ValueError, ArchiveError, JobError):
            n_steps, batch_size = whole(n_steps, "steps"), whole(batch_size, "batch_size")
            if baseline_label not in BASELINE_CHOICES:
                raise JobError(f"Baseline: {str(baseline_label)[:40]!r} is not one of the listed baselines")
            args = dict(backbone=str(backbone_key or ""), baseline=BASELINE_CHOICES[baseline_label],
                        flops_reduction=float(flops), steps=n_steps, batch_size=batch_size,
                        backbone_lr=END_TO_END_LR if e2e else None, data=(data_text or "").strip() or "synthetic",
                        val_size=200, **live_intervals(n_steps, evaluations=4))
            if archive_file:                    # every field checked, then unpacked; a refusal leaves nothing
                new = jobs.submit_archive(archive_file, device=on_device, owner=owner, visitor=address,
                                          kind="segment", **args)
            else:
                new = jobs.submit(device=on_device, owner=owner, visitor=address, kind="segment", **args)
        return new.id, gr.update(choices=job_ids(), value=new.id), jobs_table(jobs, owner)

    w.start.click(on_start, [w.backbone, w.baseline, w.reduction, w.data, w.archive, w.steps, w.batch, w.end_to_end,
                             w.device], [started, job, table], api_name="start_segmentation", concurrency_limit=1,
                  concurrency_id="jobs")
