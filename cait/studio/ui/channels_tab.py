"""The Channels tab: the q/k, v and FFN channels each block of the twin keeps (the paper's Fig. 6)."""
from __future__ import annotations

import gradio as gr

from ..channels import channels_view
from ..engine import Studio
from .common import COMPUTE, heavy
from .model_bar import ModelBar, pair_of


def build(studio: Studio, bar: ModelBar) -> None:
    """The tab's widgets and handler (inside ``gr.Tab``)."""
    gr.Markdown("Channels each block keeps after CDCP, as a share of the original (the paper's Fig. 6), blocks "
                "numbered from 0. All heads of a block keep the same q/k and v widths (head-level consistency).")
    show = gr.Button("Show retained channels", variant="primary")
    plot = gr.Plot(label="Retained channels")

    def on_channels(model, reduction, merge, request: gr.Request):
        p = pair_of(studio, model, reduction, merge, request)
        return channels_view(p, studio.catalogue.label(p.ref))

    show.click(heavy(studio.slot, on_channels), bar.settings, plot, api_name="channels", **COMPUTE)
