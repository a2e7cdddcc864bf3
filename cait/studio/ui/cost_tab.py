"""The Cost tab: FLOPs, parameters, the FLOPs-ideal speed-up, and throughput measured live for the original, its
twin and ToMe at the twin's FLOPs, in one run on this device."""
from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from ...measure.precision import PRECISIONS
from ..cost import cost_view
from ..engine import Studio
from .common import COMPUTE, heavy, refusing
from .model_bar import ModelBar, pair_of

COST_COLUMNS = ["model", "held-out top-1 (%)", "GFLOPs", "params (M)", "FLOPs reduction (%)", "ideal speed-up",
                "images/s", "speed-up", "latency, batch 1 (ms)", "latency speed-up", "rounds"]
SMALL_BATCH_NOTE = ("Small batches leave the processor partly idle, so measured speed-ups are smaller than at batch "
                    "32 or more (DeiT-Tiny at 50% on a 2-core CPU: 1.21× at batch 8, 1.88× at 32, for 2.22× ideal).")


def build(studio: Studio, bar: ModelBar) -> None:
    """The tab's widgets and handler (inside ``gr.Tab``)."""
    gr.Markdown("FLOPs are fvcore's, one multiply-add = one FLOP, attention matmuls included; *ideal speed-up* is the "
                "FLOPs ratio. Throughput is measured on the device above: the original, its CAIT twin and ToMe at the "
                "twin's FLOPs, alternately, on the same input, at the batch size below and at batch 1 (*latency*: "
                "one image at a time, where ToMe's matching costs more than its FLOPs say). In a precision other "
                "than fp32 the fp32 original is timed too, first, so each speed-up is against it. Every timed figure "
                "is the median over the rounds with the lowest and highest round in brackets; the timing stops "
                "starting rounds after a time budget and *rounds* says how many it managed. Top-1 is on the "
                "held-out images counted in its header. " + SMALL_BATCH_NOTE)
    with gr.Row():
        measure = gr.Checkbox(value=True, label="Measure throughput")
        precision = gr.Dropdown(list(PRECISIONS), value="fp32", label="Precision", elem_id="precision",
                                info="bf16: bf16 weights; bf16-autocast; int8: dynamic int8 Linears (CPU)")
        batch_size = gr.Slider(1, studio.limits.max_cost_batch if studio.limits.public else 256, value=32, step=1,
                               label="Batch size", elem_id="cost-batch")
        show = gr.Button("Compute cost", variant="primary")
    # Named columns before the first measurement, not Gradio's placeholder "1 2 3".
    table = gr.Dataframe(pd.DataFrame(columns=COST_COLUMNS), label="Cost", wrap=True, elem_id="cost-table",
                         interactive=False)
    with gr.Row():
        plot = gr.Plot(label="FLOPs per block")
        speed_plot = gr.Plot(label="Throughput")

    def on_cost(model, reduction, merge, measure_speed, batch, precision_name, request: gr.Request,
                progress=gr.Progress()):
        started = time.perf_counter()                  # the budget bounds the whole request, the build included
        p = pair_of(studio, model, reduction, merge, request)
        progress(0, desc="FLOPs and parameters")
        with refusing(ValueError):
            return cost_view(p, studio.limits, measure=measure_speed, batch_size=int(batch),
                             progress=lambda f, what: progress(f, desc=f"measuring throughput: {what}"),
                             precision=precision_name, started=started)

    show.click(heavy(studio.slot, on_cost), bar.settings + [measure, batch_size, precision],
               [table, plot, speed_plot],
               api_name="cost",
               **COMPUTE)
