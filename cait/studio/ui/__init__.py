"""The Gradio UI, one file per part of the page: the model bar, then a tab each. ``app.py`` only launches it.

::

    model_bar        model, FLOPs reduction, ATME layout, Build, status, Download the twin
    attention_tab    CLS attention of both models on a photo, a synthetic sample or an upload
    channels_tab     retained channels per block (Fig. 6)
    cost_tab         FLOPs, params, ideal and measured speed-up, with ToMe at the twin's FLOPs
    segmentation_tab the bundled segmenters' and a job's masks, per-class IoU, FLOPs and speed (dense transfer)
    finetune_tab     background fine-tune jobs: estimate, start, live curves, cancel, compare
    segment_job      the Fine-tune tab's segmentation jobs (python -m cait.dense in the background)
    compactors_tab   a job's compactor norms and CDCP against global selection (Fig. 7, Tab. XI)
    guard            public mode: Gradio's upload route held to the disk budgets
"""
from __future__ import annotations

import functools
import os

import gradio as gr
from starlette.middleware import Middleware

from ..engine import Studio
from ..jobs.manager import JobManager
from . import attention_tab, channels_tab, compactors_tab, cost_tab, finetune_tab, model_bar, segmentation_tab
from .guard import AdmissionGuard

EXPLAINER = """
**What am I looking at?** Two models side by side: an original **DeiT** and its **CAIT twin**, which needs about half
the FLOPs (one FLOP = one multiply-add).

- **ATME** (asymmetric token merging) halves the number of tokens at a few chosen blocks: **HTM** fuses each pair of
  horizontally adjacent patch tokens, **VTM** each vertical pair, through a learned `Linear(2C, C)`. A layout such as
  `h4,v7` means HTM before block 4 and VTM before block 7 (blocks are numbered from 0 everywhere in this app). The
  grid stays a grid, so attention maps and dense features map back onto the image.
- **CDCP** (consistent dynamic channel pruning) removes q/k, v and FFN channels. During fine-tuning, *compactors*
  (square matrices after each Linear) score every channel; the masked set **S** is what will be removed (|S| counts
  units: a q/k pair, a v channel, an FFN channel). Every head of a block keeps the same widths (*head-level
  consistency*) and q and k lose the same channels (*attention-level consistency*), so the result is still a plain,
  fast attention.
- **CLS attention** shows where the classifier token looks in a block: brighter = more attention. **ToMe** (Cost tab)
  is a token-merging baseline at the same FLOPs.

Details: the repository's docs (`docs/`: *The app*, *The method*, *Fine-tuning*, *Training-free compression*).
"""


def _upload_room(jobs: JobManager, n: int, who: str | None) -> None:
    """An upload of ``n`` bytes fits the runs directory and visitor ``who``'s share (else DiskFull); it is then
    charged to them until Gradio's cache retires it."""
    jobs.check_room(n, "this upload", who)
    jobs.charges.bytes(who, n, jobs.limits.cache_retention_s)


def launch_options(studio: Studio) -> dict:
    """Keyword arguments for ``Blocks.launch`` under the studio's limits: in public mode the upload size cap and
    :class:`cait.studio.ui.guard.AdmissionGuard` in front of every route (``app.py`` and the tests use it)."""
    limits = studio.limits
    if not limits.public:
        return {}
    jobs = studio.jobs
    room = None if jobs is None else functools.partial(_upload_room, jobs)
    return dict(max_file_size=f"{limits.max_upload_bytes // 1_000_000}mb",
                app_kwargs={"middleware": [Middleware(AdmissionGuard, limits=limits, room=room)]})


def build_app(studio: Studio | None = None, poll_s: float = 2.0) -> gr.Blocks:
    """The Gradio Blocks UI over a :class:`cait.studio.engine.Studio` (one with a job manager is created if not
    given); job views refresh every ``poll_s`` seconds."""
    studio = studio or Studio(jobs=JobManager())
    public = studio.limits.public
    if public:
        # uvicorn believes X-Forwarded-For from loopback by default, so any local caller could pick its address;
        # here nothing rewrites the peer, and cait.studio.public.client_address decides which proxy to believe.
        os.environ.setdefault("FORWARDED_ALLOW_IPS", "")
        if studio.jobs is not None:                # Gradio's upload cache inside the runs directory and its budget
            os.environ.setdefault("GRADIO_TEMP_DIR", str(studio.jobs.root / "gradio"))
    # Public: Gradio's own upload cache is emptied of files over an hour old, every 10 minutes.
    with gr.Blocks(title="CAIT Studio", delete_cache=(600, 3600) if public else None) as demo:
        gr.Markdown("# CAIT Studio\nA DeiT next to its CAIT twin: asymmetric token merging (ATME) + consistent "
                    "dynamic channel pruning (CDCP).")
        with gr.Accordion("What am I looking at?", open=False):
            gr.Markdown(EXPLAINER)
        bar = model_bar.build(studio)
        with gr.Tab("Attention"):
            block = attention_tab.build(studio, bar)
        with gr.Tab("Channels"):
            channels_tab.build(studio, bar)
        with gr.Tab("Cost"):
            cost_tab.build(studio, bar)
        with gr.Tab("Segmentation"):
            segmentation_tab.build(studio, studio.segmenters)
        finetune = None
        if studio.jobs is not None:
            with gr.Tab("Fine-tune"):
                finetune = finetune_tab.build(studio, bar, poll_s)
            with gr.Tab("Compactors"):
                compactors_tab.build(studio, finetune.job)
        model_bar.wire(studio, bar, block, demo)
        if finetune is not None:
            demo.load(finetune.on_load, None, finetune.load_outputs, api_visibility="private")
    return demo
