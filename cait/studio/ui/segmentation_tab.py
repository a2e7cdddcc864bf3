"""The Segmentation tab: the bundled segmenters — the original's and its CAIT twin's, ToMe's and token pruning's on
request — on a photo, a held-out synthetic sample (with its true mask) or an upload; per-class IoU on the held-out
set; FLOPs, throughput and latency measured in one run."""
from __future__ import annotations

import gradio as gr

from ...data.photos import ImageError
from ..engine import Studio
from ..samples import load_sample, sample_names
from ..segmentation import BASELINES, LABELS, BundledSegmenters, segmentation_view, segmenter_cost
from .common import COMPUTE, refusing

NOT_BUNDLED = ("*No bundled segmenters in this checkout:* `python assets/train_segmenters.py` trains them (a few "
               "minutes each on a CPU) into `assets/segmenters/`; `python -m cait.dense` trains one on any backbone.")


def build(studio: Studio, segs: BundledSegmenters) -> None:
    """The tab's widgets and handlers (inside ``gr.Tab``)."""
    names = segs.available()
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
        show = gr.Button("Segment", variant="primary", interactive=bool(names))
    with gr.Row(equal_height=True):
        truth = gr.AnnotatedImage(label="True mask (synthetic samples)", height=280)
        panels = {n: gr.AnnotatedImage(label=LABELS[n], height=280, visible=n not in BASELINES,
                                       elem_id=f"seg-{n}") for n in LABELS if n in names}
    gr.Dataframe(segs.scores(), label="Per-class IoU (%) on 1000 held-out synthetic images, as shipped",
                 interactive=False)
    with gr.Row():
        batch = gr.Slider(1, studio.limits.max_cost_batch if studio.limits.public else 64, value=8, step=1,
                          label="Batch size (throughput)")
        measure = gr.Button("Measure speed", interactive=bool(names))
    cost = gr.Dataframe(label="Segmenters: FLOPs, throughput and latency (this device, one run)", interactive=False)
    baseline_of = {LABELS[n]: n for n in BASELINES}

    def on_segment(name, file, also):
        chosen = [n for n in names if n not in BASELINES] + [baseline_of[a] for a in also if a in baseline_of]
        with refusing(ValueError, ImageError):
            size = int(segs.get(chosen[0]).backbone.patch_embed.img_size[0])
            view = segmentation_view(segs, chosen, load_sample(name, file, size, studio.limits.image_pixels_cap()))
        out = [gr.update(value=view.truth, color_map=view.colours) if view.truth else gr.update(value=None)]
        for n in panels:
            out.append(gr.update(value=view.masks[n], color_map=view.colours, visible=True) if n in view.masks
                       else gr.update(value=None, visible=n not in BASELINES))
        return out

    def on_measure(batch_size, also, progress=gr.Progress()):
        chosen = [n for n in names if n not in BASELINES] + [baseline_of[a] for a in also if a in baseline_of]
        with refusing(ValueError):
            return segmenter_cost(segs, chosen, studio.limits, int(batch_size),
                                  progress=lambda f, what: progress(f, desc=f"measuring: {what}"))

    show.click(on_segment, [sample, upload, extra], [truth, *panels.values()], api_name="segment", **COMPUTE)
    measure.click(on_measure, [batch, extra], cost, api_name="segmenter_cost", **COMPUTE)
