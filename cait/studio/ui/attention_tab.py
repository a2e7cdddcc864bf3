"""The Attention tab: an image (bundled photo, held-out synthetic sample or upload) beside both models' CLS
attention, head-mean with a colour scale and per head, top-5, the classes and, for synthetic samples, the share of
attention inside the object."""
from __future__ import annotations

import gradio as gr

from ...data.photos import ImageError
from ..attention import attention_view
from ..engine import Studio
from ..samples import load_sample, sample_names
from .common import COMPUTE, heavy, refusing
from .model_bar import ModelBar, pair_of


def build(studio: Studio, bar: ModelBar) -> gr.Slider:
    """The tab's widgets and handler (inside ``gr.Tab``); returns the block slider, which *Build* resizes."""
    with gr.Row():
        sample = gr.Dropdown(sample_names(), value=studio.default_sample(), label="Bundled photo or synthetic sample")
        # A File, not an Image: our own validation then explains a bad upload (gr.Image fails opaquely).
        upload = gr.File(label="…or your own image (overrides the photo)", file_types=["image"], type="filepath",
                         height=140)
        block = gr.Slider(0, 11, value=11, step=1, label="Block (from 0; CLS attention of this block)")
        scale = gr.Radio(["shared", "each its own"], value="shared", label="Colour scale of the two head-mean maps")
    show = gr.Button("Show CLS attention", variant="primary")
    with gr.Row(equal_height=True):
        view = gr.Image(label="Input (what the models see)", type="pil", height=300)
        orig_mean = gr.Image(label="Original: head-mean CLS attention (share per patch)", type="pil", height=300)
        comp_mean = gr.Image(label="CAIT twin: head-mean CLS attention (share per patch)", type="pil", height=300)
    with gr.Row():
        orig_heads = gr.Gallery(label="Original, per head", columns=6, height=240, object_fit="contain")
        comp_heads = gr.Gallery(label="CAIT twin, per head", columns=6, height=240, object_fit="contain")
    with gr.Row():
        orig_top5 = gr.Label(num_top_classes=5, label="Original: top-5")
        comp_top5 = gr.Label(num_top_classes=5, label="CAIT twin: top-5")
    localisation = gr.Markdown()

    def on_attention(model, reduction, merge, name, file, block_index, scale_choice, request: gr.Request):
        p = pair_of(studio, model, reduction, merge, request)
        with refusing(ValueError, ImageError):
            s = load_sample(name, file, int(p.original.patch_embed.img_size[0]), studio.limits.image_pixels_cap())
            v = attention_view(p, s, int(block_index), shared_scale=scale_choice != "each its own")
        return (v.image, v.original_mean, v.compressed_mean, v.original_heads, v.compressed_heads, v.original_top5,
                v.compressed_top5, v.localisation_text())

    show.click(heavy(studio.slot, on_attention), bar.settings + [sample, upload, block, scale],
               [view, orig_mean, comp_mean, orig_heads, comp_heads, orig_top5, comp_top5, localisation],
               api_name="attention", **COMPUTE)
    return block
