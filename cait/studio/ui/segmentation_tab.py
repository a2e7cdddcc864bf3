"""The Segmentation tab: the bundled segmenters — the original's and its CAIT twin's, ToMe's and token pruning's on
request, and one a finished segmentation job made — on a photo, a held-out synthetic sample (with its true mask) or an
upload; per-class IoU on the held-out set; FLOPs, throughput and latency measured in one run."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from ...data.photos import ImageError
from ..engine import Studio
from ..samples import load_sample, sample_names
from ..segmentation import BASELINES, LABELS, BundledSegmenters, JobSegmenters, segmentation_view, segmenter_cost
from .common import COMPUTE, heavy, refusal, refusing, visitor

NOT_BUNDLED = ("*No bundled segmenters in this checkout:* `python assets/train_segmenters.py` trains them (a few "
               "minutes each on a CPU) into `assets/segmenters/`; `python -m cait.dense` trains one on any backbone.")


class _Handlers:
    """The tab's answers: masks of the chosen segmenters (bundled, plus a job's), and their measured speed."""

    def __init__(self, studio: Studio, segs: BundledSegmenters, job_segs: JobSegmenters) -> None:
        self.studio, self.segs, self.job_segs = studio, segs, job_segs
        self.names = segs.available()
        self.panels = [n for n in LABELS if n in self.names]

    def chosen(self, also) -> list[str]:
        """The bundled segmenters shown: the original and the twin, and the baselines ticked."""
        baseline_of = {LABELS[n]: n for n in BASELINES}
        return [n for n in self.names if n not in BASELINES] + [baseline_of[a] for a in also if a in baseline_of]

    def _view(self, segs, names: list[str], name, file):
        size = int(segs.get(names[0]).backbone.patch_embed.img_size[0])
        return segmentation_view(segs, names, load_sample(name, file, size, self.studio.limits.image_pixels_cap()))

    def on_segment(self, name, file, also, job_id, request: gr.Request):
        chosen = self.chosen(also or [])
        if not chosen and not job_id:
            raise refusal(NOT_BUNDLED.replace("*", "") + " Or pick a segmentation job's segmenter.")
        with refusing(ValueError, ImageError):
            mine = {job_id: self.job_segs.get(job_id, visitor(request)[0])} if job_id else {}
            view = self._view(self.segs, chosen, name, file) if chosen else None
            mine_view = self._view(mine, [job_id], name, file) if mine else None
        first = view or mine_view
        out = [gr.update(value=first.truth, color_map=first.colours) if first.truth else gr.update(value=None)]
        for n in self.panels:
            out.append(gr.update(value=view.masks[n], color_map=view.colours, visible=True) if view and n in view.masks
                       else gr.update(value=None, visible=n not in BASELINES))
        out.append(gr.update(value=mine_view.masks[job_id], color_map=mine_view.colours, visible=True,
                             label=f"Segmentation job {job_id}") if mine_view else gr.update(value=None, visible=False))
        return out

    def on_focus(self, request: gr.Request):
        return gr.update(choices=self.job_segs.available(visitor(request)[0]))

    def on_measure(self, batch_size, also, request: gr.Request, progress=gr.Progress()):
        with refusing(ValueError):
            return segmenter_cost(self.segs, self.chosen(also or []), self.studio.limits, int(batch_size),
                                  progress=lambda f, what: progress(f, desc=f"measuring: {what}"))


def build(studio: Studio, segs: BundledSegmenters) -> None:
    """The tab's widgets and handlers (inside ``gr.Tab``)."""
    h = _Handlers(studio, segs, JobSegmenters(studio.jobs, studio.device))
    names = h.names
    gr.Markdown("One Semantic FPN decoder per backbone, trained the same way on a frozen backbone (a probe): the "
                "original DeiT-Tiny, its CAIT twin, and ToMe and token pruning at the twin's FLOPs. ATME keeps the "
                "patch grid a grid, so the twin's blocks map onto the image directly; ToMe's merges must be undone "
                "and token pruning's drops filled in first (paper §IV-B1). " + ("" if names else NOT_BUNDLED))
    with gr.Row():
        sample = gr.Dropdown(sample_names(), value=next(s for s in sample_names() if s.startswith("synthetic")),
                             label="Bundled photo or synthetic sample")
        upload = gr.File(label="…or your own image (overrides the sample)", file_types=["image"], type="filepath",
                         height=140)
        extra = gr.CheckboxGroup([LABELS[n] for n in BASELINES if n in names], value=[], label="Also show",
                                 elem_id="seg-extra")
        job = gr.Dropdown(h.job_segs.available(), value=None, label="…and a segmenter a job made",
                          info="start one in the Fine-tune tab", allow_custom_value=False, elem_id="seg-job")
        show = gr.Button("Segment", variant="primary")
    with gr.Row(equal_height=True):
        truth = gr.AnnotatedImage(label="True mask (synthetic samples)", height=280)
        panels = [gr.AnnotatedImage(label=LABELS[n], height=280, visible=n not in BASELINES, elem_id=f"seg-{n}")
                  for n in h.panels]
        job_panel = gr.AnnotatedImage(label="Segmentation job", height=280, visible=False, elem_id="seg-job-mask")
    gr.Dataframe(segs.scores(), label="Per-class IoU (%) on 1000 held-out synthetic images, as shipped",
                 interactive=False)
    with gr.Row():
        batch = gr.Slider(1, studio.limits.max_cost_batch if studio.limits.public else 64, value=8, step=1,
                          label="Batch size (throughput)")
        measure = gr.Button("Measure speed", interactive=bool(names))
    cost = gr.Dataframe(pd.DataFrame(columns=["segmenter", "backbone GFLOPs", "segmenter GFLOPs", "images/s",
                                              "speed-up", "latency, batch 1 (ms)", "latency speed-up", "rounds"]),
                        label="Segmenters: FLOPs, throughput and latency (this device, one run; median (min–max) "
                              "over rounds)", interactive=False)
    show.click(heavy(studio.slot, h.on_segment), [sample, upload, extra, job], [truth, *panels, job_panel],
               api_name="segment", **COMPUTE)
    job.focus(h.on_focus, None, job, api_visibility="private")
    measure.click(heavy(studio.slot, h.on_measure), [batch, extra], cost, api_name="segmenter_cost", **COMPUTE)
