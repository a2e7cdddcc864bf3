"""The bar above the tabs: which model, how much to compress it, its ATME layout, *Build*, the status line and
*Download the twin*. Every tab builds its answer from the pair these settings name."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..download import download_twin
from ..engine import Studio
from ..jobs.model import JobError
from ..pairs import REDUCTION_RANGE, ModelPair
from .common import COMPUTE, heavy, refusing, visitor

DEFAULT_REDUCTION = 0.5


@dataclass
class ModelBar:
    """The bar's widgets; ``settings`` are the inputs every tab's handler takes first."""

    model: gr.Dropdown
    reduction: gr.Number
    merge: gr.Textbox
    build: gr.Button
    status: gr.Markdown

    @property
    def settings(self) -> list:
        return [self.model, self.reduction, self.merge]


def pair_of(studio: Studio, model: str, reduction, merge: str, request: gr.Request | None = None) -> ModelPair:
    """The pair the bar's settings name for the requesting session, or a ``gr.Error`` naming the field."""
    with refusing(ValueError):
        return studio.pair(model, reduction, merge, viewer=visitor(request)[0])


def build(studio: Studio) -> ModelBar:
    """The bar's widgets (inside the Blocks context); :func:`wire` connects them once the tabs exist."""
    with gr.Row():
        local = not studio.limits.public
        model = gr.Dropdown(studio.catalogue.choices(None), value=studio.catalogue.default().key, label="Model",
                            elem_id="model", allow_custom_value=local,
                            info="the bundled offline pair, DeiTs (timm ImageNet weights), other ViTs, then finished "
                                 "fine-tune jobs" + ("; or type a timm name, hf-hub:owner/name or a checkpoint folder"
                                                     if local else ""))
        # A number, not a slider: a value out of range is refused by name instead of clamped silently.
        reduction = gr.Number(DEFAULT_REDUCTION, label="Total FLOPs reduction", step=0.05, elem_id="reduction",
                              info=f"{REDUCTION_RANGE[0]} to {REDUCTION_RANGE[1]}")
        merge = gr.Textbox(label="ATME layout (optional)", placeholder="e.g. h4,v7 (blocks from 0), none or auto",
                           elem_id="merge", info="empty: the paper's plan; none: CDCP only; auto: measured planner "
                                                 "(minutes; local mode)")
        build_button = gr.Button("Build CAIT twin", variant="primary")
    status = gr.Markdown(studio.startup_note(), elem_id="status")
    bar = ModelBar(model, reduction, merge, build_button, status)
    with gr.Row():
        download = gr.Button("Download the twin (safetensors + config.json)", size="sm")
        twin_file = gr.File(label="CAIT twin checkpoint (.zip)", elem_id="twin-file", visible=False)
    jobs = studio.jobs
    if studio.limits.public and jobs is not None:
        # Inside Gradio's cache (RUNS/gradio in public mode) Gradio serves the zip as is, without a second copy,
        # and retires it with the rest of its cache.
        where = Path(gr.utils.get_upload_folder()) / "cait-downloads"
    else:
        where = (jobs.root if jobs is not None else Path(tempfile.gettempdir()) / "cait-studio") / "downloads"

    def on_download(model, reduction, merge, request: gr.Request):
        p = pair_of(studio, model, reduction, merge, request)
        # Locally Gradio copies the zip into its cache; in public mode the one zip counts toward the disk budget.
        room = None if jobs is None else (lambda n: jobs.check_room(n, "this download"))
        with refusing(JobError):
            zipped = download_twin(p, where, room)
        if jobs is not None:
            jobs.charge(zipped)                        # the visitor it was made for holds it, not the Space
        return gr.update(value=str(zipped), visible=True)

    download.click(heavy(studio.slot, on_download), bar.settings, twin_file, api_name="download_twin", **COMPUTE)
    return bar


def wire(studio: Studio, bar: ModelBar, block: gr.Slider, demo: gr.Blocks) -> None:
    """*Build*, a model change and the page load rebuild the twin; edited settings say they need a build."""

    def on_build(model, reduction, merge, request: gr.Request):
        """Status, block slider, and whether the reduction/layout controls apply; a failure goes into the status
        (with a warning toast), so no component is left showing an error badge."""
        try:
            p = studio.pair(model, reduction, merge, viewer=visitor(request)[0])
        except ValueError as e:
            gr.Warning(str(e))
            return f"**Could not build the twin:** {e}", gr.update(), gr.update(), gr.update()
        depth = len(p.original.blocks)                     # the block slider follows the model (6 for the tiny DeiT)
        fixed = None if p.settings_apply else "fixed by the fine-tuned twin"
        return (studio.status(p), gr.update(maximum=depth - 1, value=depth - 1),
                gr.update(interactive=p.settings_apply, info=fixed or f"{REDUCTION_RANGE[0]} to {REDUCTION_RANGE[1]}"),
                gr.update(interactive=p.settings_apply, info=fixed or "planned when empty"))

    def on_settings_changed():
        return "*Settings changed: press **Build CAIT twin** to update the twin and this status.*"

    outputs = [bar.status, block, bar.reduction, bar.merge]
    bar.build.click(heavy(studio.slot, on_build), bar.settings, outputs, api_name="build", **COMPUTE)
    bar.model.change(heavy(studio.slot, on_build), bar.settings, outputs, api_visibility="private", **COMPUTE)
    bar.reduction.input(on_settings_changed, None, bar.status, api_visibility="private")
    bar.merge.input(on_settings_changed, None, bar.status, api_visibility="private")
    demo.load(heavy(studio.slot, on_build), bar.settings, outputs, api_visibility="private", **COMPUTE)
