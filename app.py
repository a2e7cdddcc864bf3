"""CAIT Studio: compare a DeiT with its CAIT-compressed twin in the browser.

    python app.py [--host 127.0.0.1] [--port 7860] [--device cpu|cuda] [--offline]

Listens on 127.0.0.1 unless told otherwise (``--host`` or ``GRADIO_SERVER_NAME``). The widgets live here; every
answer comes from ``cait.studio``.
"""
from __future__ import annotations

import argparse
import os

import gradio as gr

from cait.models import DEIT_MODELS
from cait.photos import SAMPLE_PHOTOS
from cait.studio import Studio

DEFAULT_MODEL = "DeiT-Tiny"
DEFAULT_REDUCTION = 0.5


def build_app(studio: Studio | None = None) -> gr.Blocks:
    """The Gradio Blocks UI over a :class:`cait.studio.Studio` (one is created if not given)."""
    studio = studio or Studio()

    def pair(model, reduction, merge):
        try:
            return studio.pair(model, reduction, merge)
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def on_build(model, reduction, merge):
        return studio.status(pair(model, reduction, merge))

    def on_attention(model, reduction, merge, sample, upload, block):
        p = pair(model, reduction, merge)
        try:
            image = studio.image(sample, upload)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        v = studio.attention(p, image, int(block) - 1)
        return (v.original_mean, v.compressed_mean, v.original_heads, v.compressed_heads, v.original_top5,
                v.compressed_top5)

    def on_channels(model, reduction, merge):
        return studio.channels(pair(model, reduction, merge))

    def on_cost(model, reduction, merge, measure, batch_size):
        return studio.cost(pair(model, reduction, merge), measure=measure, batch_size=int(batch_size))

    with gr.Blocks(title="CAIT Studio") as demo:
        gr.Markdown("# CAIT Studio\nA DeiT next to its CAIT twin: asymmetric token merging (ATME) + consistent "
                    "dynamic channel pruning (CDCP).")
        with gr.Row():
            model = gr.Dropdown(list(DEIT_MODELS.values()), value=DEFAULT_MODEL, label="Model")
            reduction = gr.Slider(0.05, 0.8, value=DEFAULT_REDUCTION, step=0.01, label="Total FLOPs reduction")
            merge = gr.Textbox(label="ATME layout (optional)", placeholder="planned; or e.g. h4,v7 (0-based blocks)")
            build = gr.Button("Build CAIT twin", variant="primary")
        status = gr.Markdown(f"Device: `{studio.device}`. Press *Build CAIT twin* to load the models.")
        settings = [model, reduction, merge]

        with gr.Tab("Attention"):
            with gr.Row():
                sample = gr.Dropdown(list(SAMPLE_PHOTOS), value=next(iter(SAMPLE_PHOTOS)), label="Bundled photo")
                # A File, not an Image: our own validation then explains a bad upload (gr.Image fails opaquely).
                upload = gr.File(label="…or your own image (overrides the photo)", file_types=["image"],
                                 type="filepath", height=140)
                block = gr.Slider(1, 12, value=12, step=1, label="Block (1-based; CLS attention of this block)")
            show = gr.Button("Show CLS attention", variant="primary")
            with gr.Row():
                orig_mean = gr.Image(label="Original: head-mean CLS attention", type="pil")
                comp_mean = gr.Image(label="CAIT twin: head-mean CLS attention", type="pil")
            with gr.Row():
                orig_heads = gr.Gallery(label="Original, per head", columns=6, height=220)
                comp_heads = gr.Gallery(label="CAIT twin, per head", columns=6, height=220)
            with gr.Row():
                orig_top5 = gr.Label(num_top_classes=5, label="Original: top-5")
                comp_top5 = gr.Label(num_top_classes=5, label="CAIT twin: top-5")
            show.click(on_attention, settings + [sample, upload, block],
                       [orig_mean, comp_mean, orig_heads, comp_heads, orig_top5, comp_top5], api_name="attention")

        with gr.Tab("Channels"):
            gr.Markdown("Channels each block keeps after CDCP, as a share of the original (the paper's Fig. 6). "
                        "All heads of a block keep the same q/k and v widths (head-level consistency).")
            show_channels = gr.Button("Show retained channels", variant="primary")
            channels_plot = gr.Plot(label="Retained channels")
            show_channels.click(on_channels, settings, channels_plot, api_name="channels")

        with gr.Tab("Cost"):
            gr.Markdown("FLOPs are fvcore's, one multiply-add = one FLOP, attention matmuls included. Throughput is "
                        "measured on the device above, both models alternately, same input.")
            with gr.Row():
                measure = gr.Checkbox(value=True, label="Measure throughput")
                batch_size = gr.Slider(1, 256, value=8, step=1, label="Batch size")
                show_cost = gr.Button("Compute cost", variant="primary")
            cost_df = gr.Dataframe(label="Cost")
            flops_plot = gr.Plot(label="FLOPs per block")
            show_cost.click(on_cost, settings + [measure, batch_size], [cost_df, flops_plot], api_name="cost")

        build.click(on_build, settings, status, api_name="build")
        demo.load(on_build, settings, status, api_visibility="private")
    return demo


def main() -> None:
    p = argparse.ArgumentParser(description="CAIT Studio")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--offline", action="store_true", help="do not try the Hugging Face Hub (random weights)")
    a = p.parse_args()
    studio = Studio(device=a.device, pretrained=not a.offline)
    build_app(studio).queue().launch(server_name=a.host, server_port=a.port)


if __name__ == "__main__":
    main()
