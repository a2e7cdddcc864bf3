"""The Compactors tab: a job's compactor row norms with S marked (the paper's Fig. 7), and what plain global selection
without consistency could deploy at the same FLOPs (the contrast of Tab. XI)."""
from __future__ import annotations

import gradio as gr

from ..engine import Studio
from ..jobs.views import compactor_view
from .common import COMPUTE, heavy, refusal, refusing, visitor


def build(studio: Studio, job: gr.Dropdown) -> None:
    """The tab's widgets and handler (inside ``gr.Tab``), for the job selected in the Fine-tune tab."""
    gr.Markdown("Compactor row norms ‖Q_j‖ of q, k and v per head and of the FFN per block (the paper's Fig. 7), with "
                "the masked set S shaded, for the job selected in the Fine-tune tab; and what plain global selection, "
                "without head- or attention-level consistency, could remove at the same FLOPs (the contrast of the "
                "paper's Tab. XI).")
    show = gr.Button("Show compactors of the selected job", variant="primary")
    summary = gr.Markdown()
    norms = gr.Plot(label="Compactor row norms")
    contrast = gr.Plot(label="CDCP vs global selection")

    def on_compactors(job_id, request: gr.Request):
        if not job_id:
            raise refusal("select a job first")
        with refusing(ValueError, KeyError):
            return compactor_view(studio.jobs, job_id, visitor(request)[0])

    show.click(heavy(studio.slot, on_compactors), job, [summary, norms, contrast], api_name="compactors", **COMPUTE)
