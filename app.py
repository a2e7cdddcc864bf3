"""CAIT Studio: compare a DeiT with its CAIT-compressed twin in the browser.

    python app.py [--host 127.0.0.1] [--port 7860] [--device cpu|cuda] [--offline] [--public | --no-public]

Listens on 127.0.0.1 unless told otherwise (``--host`` or ``GRADIO_SERVER_NAME``). Public mode (on by default on a
Hugging Face Space, ``CAIT_PUBLIC=1``, ``--public``) caps every heavy request and accepts no server path
(:mod:`cait.public`). The widgets live here; every answer comes from ``cait.studio``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import gradio as gr

from cait.jobs import JobError, JobManager, job_key
from cait.models import TEST_MODEL
from cait.public import ArchiveError, Limits, extract_archive, on_space, visitor_key
from cait.jobviews import compactor_view, finetune_estimate, job_view, jobs_table
from cait.studio import REDUCTION_RANGE, Studio

LOOPBACK = ("127.0.0.1", "localhost", "::1")
COMPUTE = dict(concurrency_id="compute", concurrency_limit=1)
"""Heavy events share one worker: a visitor cannot start two model passes at once, nor can two visitors."""

DEFAULT_REDUCTION = 0.5
BUNDLED_FINETUNE = {"bundled DeiT-Tiny (trained here on synthetic shapes, 224 px) → its CAIT twin": "bundled"}
"""The default fine-tune: what the app shows offline, compressed by the engine."""
FINETUNE_MODELS = {f"tiny test DeiT (32 px, {TEST_MODEL}): about a minute on a CPU": TEST_MODEL,
                   "DeiT-Tiny (224 px)": "deit_tiny_patch16_224", "DeiT-Small (224 px)": "deit_small_patch16_224",
                   "DeiT-Base (224 px)": "deit_base_patch16_224"}


def _whole(value, key: str) -> int:
    """A whole number from a Number field, or a :class:`JobError` naming the field (Gradio may send floats)."""
    from cait.jobs import FIELD_NAMES
    if value is None or float(value) != int(float(value)):
        raise JobError(f"{FIELD_NAMES.get(key, key)}: {value!r} is not a whole number")
    return int(float(value))


def host_warning(host: str, port: int, limits: Limits) -> str | None:
    """The warning printed when the app listens beyond loopback without public mode's caps (else None)."""
    if host in LOOPBACK or limits.public:
        return None
    return (f"warning: listening on {host} without --public: anyone who can reach port {port} can start jobs that "
            "read server paths and run for as long as they ask")


def _visitor(request: gr.Request | None) -> tuple[str | None, str | None]:
    """Hashed ``(session, address)`` of a request: the session owns its jobs, the address has a quota. On a Space the
    proxy appends the caller's address to ``X-Forwarded-For``, so its last entry is the one to trust."""
    if request is None:
        return None, None
    address = request.client.host if request.client else None
    forwarded = (request.headers or {}).get("x-forwarded-for") if on_space() else None
    if forwarded:
        address = forwarded.split(",")[-1].strip()
    return visitor_key(getattr(request, "session_hash", None)), visitor_key(address)


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

Details: the repository's README (sections *The app*, *Fine-tuning with CDCP*, *Training-free calibrated compression*).
"""
SMALL_BATCH_NOTE = ("Small batches leave the processor partly idle, so measured speed-ups are smaller than at batch "
                    "32 or more (DeiT-Tiny at 50% on a 2-core CPU: 1.21× at batch 8, 1.88× at 32, for 2.22× ideal).")


def build_app(studio: Studio | None = None, poll_s: float = 2.0) -> gr.Blocks:
    """The Gradio Blocks UI over a :class:`cait.studio.Studio` (one with a job manager is created if not given)."""
    studio = studio or Studio(jobs=JobManager())
    jobs = studio.jobs
    downloads = (jobs.root if jobs is not None else Path(tempfile.gettempdir()) / "cait-studio") / "downloads"

    def pair(model, reduction, merge):
        try:
            return studio.pair(model, reduction, merge)
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def on_build(model, reduction, merge):
        """Status, block slider, and whether the reduction/layout controls apply; a failure goes into the status
        (with a warning toast), so no component is left showing an error badge."""
        try:
            p = studio.pair(model, reduction, merge)
        except ValueError as e:
            gr.Warning(str(e))
            return (f"**Could not build the twin:** {e}", gr.update(), gr.update(), gr.update())
        depth = len(p.original.blocks)                     # the block slider follows the model (6 for the tiny DeiT)
        applies = studio.settings_apply(p)
        fixed = "fixed by the fine-tuned twin" if not applies else None
        return (studio.status(p), gr.update(maximum=depth - 1, value=depth - 1),
                gr.update(interactive=applies, info=fixed or f"{REDUCTION_RANGE[0]} to {REDUCTION_RANGE[1]}"),
                gr.update(interactive=applies, info=fixed or "planned when empty"))

    def on_settings_changed():
        return "*Settings changed: press **Build CAIT twin** to update the twin and this status.*"

    def on_attention(model, reduction, merge, sample, upload, block):
        p = pair(model, reduction, merge)
        try:
            v = studio.attention(p, studio.sample(p, sample, upload), int(block))
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return (v.image, v.original_mean, v.compressed_mean, v.original_heads, v.compressed_heads, v.original_top5,
                v.compressed_top5, v.localisation_text())

    def on_channels(model, reduction, merge):
        return studio.channels(pair(model, reduction, merge))

    def on_cost(model, reduction, merge, measure, batch_size, progress=gr.Progress()):
        p = pair(model, reduction, merge)
        progress(0, desc="FLOPs and parameters")
        try:
            return studio.cost(p, measure=measure, batch_size=int(batch_size),
                               progress=lambda f, what: progress(f, desc=f"measuring throughput: {what}"))
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def on_download(model, reduction, merge):
        return gr.update(value=str(studio.download(pair(model, reduction, merge), downloads)), visible=True)

    public = studio.limits.public
    # Public: Gradio's own upload cache is emptied of files over an hour old, every 10 minutes.
    with gr.Blocks(title="CAIT Studio", delete_cache=(600, 3600) if public else None) as demo:
        gr.Markdown("# CAIT Studio\nA DeiT next to its CAIT twin: asymmetric token merging (ATME) + consistent "
                    "dynamic channel pruning (CDCP).")
        with gr.Accordion("What am I looking at?", open=False):
            gr.Markdown(EXPLAINER)
        with gr.Row():
            model = gr.Dropdown(list(studio.model_choices()), value=studio.default_model(), label="Model",
                                elem_id="model",
                                info="the bundled offline pair, DeiTs (timm ImageNet weights), then finished "
                                     "fine-tune jobs")
            # A number, not a slider: a value out of range is refused by name instead of clamped silently.
            reduction = gr.Number(DEFAULT_REDUCTION, label="Total FLOPs reduction", step=0.05, elem_id="reduction",
                                  info=f"{REDUCTION_RANGE[0]} to {REDUCTION_RANGE[1]}")
            merge = gr.Textbox(label="ATME layout (optional)", placeholder="e.g. h4,v7 (blocks from 0), or none",
                               elem_id="merge",
                               info="planned when empty; none: no merges (CDCP only)")
            build = gr.Button("Build CAIT twin", variant="primary")
        status = gr.Markdown(studio.startup_note(), elem_id="status")
        with gr.Row():
            download = gr.Button("Download the twin (safetensors + config.json)", size="sm")
            twin_file = gr.File(label="CAIT twin checkpoint (.zip)", elem_id="twin-file", visible=False)
        settings = [model, reduction, merge]

        with gr.Tab("Attention"):
            with gr.Row():
                sample = gr.Dropdown(studio.sample_names(), value=studio.default_sample(),
                                     label="Bundled photo or synthetic sample")
                # A File, not an Image: our own validation then explains a bad upload (gr.Image fails opaquely).
                upload = gr.File(label="…or your own image (overrides the photo)", file_types=["image"],
                                 type="filepath", height=140)
                block = gr.Slider(0, 11, value=11, step=1, label="Block (from 0; CLS attention of this block)")
            show = gr.Button("Show CLS attention", variant="primary")
            with gr.Row(equal_height=True):
                view = gr.Image(label="Input (what the models see)", type="pil", height=300)
                orig_mean = gr.Image(label="Original: head-mean CLS attention (share per patch)", type="pil",
                                     height=300)
                comp_mean = gr.Image(label="CAIT twin: head-mean CLS attention (share per patch)", type="pil",
                                     height=300)
            with gr.Row():
                orig_heads = gr.Gallery(label="Original, per head", columns=6, height="auto", object_fit="contain")
                comp_heads = gr.Gallery(label="CAIT twin, per head", columns=6, height="auto", object_fit="contain")
            with gr.Row():
                orig_top5 = gr.Label(num_top_classes=5, label="Original: top-5")
                comp_top5 = gr.Label(num_top_classes=5, label="CAIT twin: top-5")
            localisation = gr.Markdown()
            show.click(on_attention, settings + [sample, upload, block],
                       [view, orig_mean, comp_mean, orig_heads, comp_heads, orig_top5, comp_top5, localisation],
                       api_name="attention", **COMPUTE)

        with gr.Tab("Channels"):
            gr.Markdown("Channels each block keeps after CDCP, as a share of the original (the paper's Fig. 6), "
                        "blocks numbered from 0. All heads of a block keep the same q/k and v widths (head-level "
                        "consistency).")
            show_channels = gr.Button("Show retained channels", variant="primary")
            channels_plot = gr.Plot(label="Retained channels")
            show_channels.click(on_channels, settings, channels_plot, api_name="channels", **COMPUTE)

        with gr.Tab("Cost"):
            gr.Markdown("FLOPs are fvcore's, one multiply-add = one FLOP, attention matmuls included; *ideal speed-up* "
                        "is the FLOPs ratio. Throughput is measured on the device above: the original, its CAIT twin "
                        "and ToMe at the twin's FLOPs, alternately, on the same input. " + SMALL_BATCH_NOTE)
            with gr.Row():
                measure = gr.Checkbox(value=True, label="Measure throughput")
                batch_size = gr.Slider(1, studio.limits.max_cost_batch if public else 256, value=32, step=1,
                                       label="Batch size")
                show_cost = gr.Button("Compute cost", variant="primary")
            cost_df = gr.Dataframe(label="Cost")
            flops_plot = gr.Plot(label="FLOPs per block")
            show_cost.click(on_cost, settings + [measure, batch_size], [cost_df, flops_plot], api_name="cost",
                            **COMPUTE)

        fine_tune_outputs = _finetune_tabs(studio, jobs, model, poll_s) if jobs is not None else None

        build_outputs = [status, block, reduction, merge]
        build.click(on_build, settings, build_outputs, api_name="build", **COMPUTE)
        model.change(on_build, settings, build_outputs, api_visibility="private", **COMPUTE)
        reduction.input(on_settings_changed, None, status, api_visibility="private")
        merge.input(on_settings_changed, None, status, api_visibility="private")
        download.click(on_download, settings, twin_file, api_name="download_twin", **COMPUTE)
        demo.load(on_build, settings, build_outputs, api_visibility="private", **COMPUTE)
        if fine_tune_outputs is not None:
            demo.load(*fine_tune_outputs, api_visibility="private")
    return demo


def _finetune_tabs(studio: Studio, jobs: JobManager, model: gr.Dropdown, poll_s: float) -> tuple:
    """The Fine-tune and Compactors tabs (inside the Blocks context). Returns ``(fn, inputs, outputs)`` of the page-load
    event that brings the job list and the model list back after a reload."""
    public = jobs.limits.public
    models = dict(BUNDLED_FINETUNE if studio.bundled is not None else {}, **FINETUNE_MODELS)
    models = {k: v for k, v in models.items() if not public or v in jobs.limits.models}

    def job_ids():
        return [j.id for j in jobs.list(limit=50)]

    def on_load(request: gr.Request):
        ids = job_ids()
        owner, _ = _visitor(request)
        return (gr.update(choices=ids, value=ids[0] if ids else None), jobs_table(jobs, owner),
                gr.update(choices=list(studio.model_choices())))

    def on_estimate(ft_model, reduction, steps, batch_size, device):
        key = models.get(ft_model, ft_model)
        try:
            args = jobs.validate(dict(model=key, steps=_whole(steps, "steps"), batch_size=_whole(batch_size,
                                      "batch_size"), flops_reduction=float(reduction)))
            return finetune_estimate(args["model"], args["steps"], args["batch_size"], args["flops_reduction"],
                                     device)
        except (ValueError, JobError) as e:
            raise gr.Error(str(e)) from None

    def on_start(ft_model, data, archive, reduction, steps, batch_size, device, request: gr.Request):
        owner, visitor = _visitor(request)
        upload = None
        try:
            data = (data or "").strip() or "synthetic"
            if archive:
                upload, dest = jobs.new_upload()
                data = str(extract_archive(archive, dest, jobs.limits))
            steps, batch_size = _whole(steps, "steps"), _whole(batch_size, "batch_size")
            job = jobs.submit(device=device, owner=owner, visitor=visitor, upload=upload,
                              model=models.get(ft_model, ft_model), data=data,
                              flops_reduction=float(reduction), steps=steps, batch_size=batch_size,
                              # Live view: log often, evaluate and checkpoint a few times, whatever the length.
                              eval_interval=min(1000, max(10, int(steps) // 5)),
                              log_interval=min(50, max(1, int(steps) // 50)),
                              ckpt_interval=min(500, max(10, int(steps) // 4)))
        except (ValueError, ArchiveError, JobError) as e:
            raise gr.Error(str(e)) from None
        return job.id, gr.update(choices=job_ids(), value=job.id), jobs_table(jobs, owner)

    def on_poll(job_id, request: gr.Request):
        owner, _ = _visitor(request)
        table = jobs_table(jobs, owner)
        choices = list(studio.model_choices())
        if not job_id:
            return table, "No job selected.", None, gr.update(choices=choices)
        try:
            text, fig = job_view(jobs, job_id, owner)
        except KeyError as e:
            raise gr.Error(str(e)) from None
        return table, text, fig, gr.update(choices=choices)

    def on_cancel(job_id, request: gr.Request):
        if not job_id:
            raise gr.Error("select a job first")
        try:
            return jobs.cancel(job_id, owner=_visitor(request)[0])
        except (KeyError, JobError) as e:
            raise gr.Error(str(e)) from None

    def on_use(job_id):
        label = next((k for k, v in studio.model_choices().items() if v == job_key(job_id)), None)
        if label is None:
            raise gr.Error(f"job {job_id} has no finished model yet")
        return gr.update(choices=list(studio.model_choices()), value=label)

    def on_compactors(job_id):
        if not job_id:
            raise gr.Error("select a job first")
        try:
            return compactor_view(jobs, job_id)
        except ValueError as e:
            raise gr.Error(str(e)) from None

    devices = ["cuda", "cpu"] if studio.device.type == "cuda" else ["cpu"]
    with gr.Tab("Fine-tune"):
        where = ("On this public Space the runs directory is not shown; finished jobs are deleted after "
                 f"{jobs.limits.retention_s / 3600:g} h." if public else
                 f"Jobs and their checkpoints live in `{jobs.root}` and survive an app restart."
                 + (" **On this Space that disk is ephemeral**: set `CAIT_RUNS_DIR` to persistent storage (e.g. "
                    "a mounted bucket) to keep them." if on_space() and not str(jobs.root).startswith("/data")
                    else ""))
        gr.Markdown("Each fine-tune runs `python -m cait.finetune` as its own process (a crash or a cancel never "
                    "takes the app down); one job per device, the others queue. " + where)
        with gr.Row():
            ft_model = gr.Dropdown(list(models), value=next(iter(models)), label="Model", elem_id="ft-model",
                                   info="the default compresses the bundled DeiT-Tiny into its CAIT twin")
            data = gr.Textbox("synthetic", label="Data", elem_id="ft-data",
                              info="'synthetic' (or empty), or upload a .zip of train/CLASS/ and val/CLASS/ images"
                                   if public else "'synthetic' (or empty) or an ImageFolder path on the server")
            archive = gr.File(label="…or an ImageFolder .zip (train/ and val/)", file_types=[".zip"],
                              type="filepath", height=100)
            ft_reduction = gr.Slider(0.0, 0.8, value=0.5, step=0.01, label="Total FLOPs reduction")
        with gr.Row():
            # No widget bounds: the server checks every field and names it in the error (cait.jobs.validate).
            steps = gr.Number(200, precision=0, label="Steps", info=f"1 to {jobs.limits.steps_cap():,}",
                              elem_id="ft-steps")
            ft_batch = gr.Number(32, precision=0, label="Batch size (even)", info=f"2 to {jobs.limits.batch_cap():,}")
            device = gr.Dropdown(devices, value=devices[0], label="Device")
            estimate = gr.Button("Estimate time")
            start = gr.Button("Start fine-tune", variant="primary")
        estimated = gr.Markdown()
        started = gr.Textbox(label="Started job", interactive=False)
        with gr.Row():
            job = gr.Dropdown(job_ids(), value=(job_ids() or [None])[0], label="Job", allow_custom_value=True,
                              elem_id="job")
            cancel = gr.Button("Cancel job", variant="stop")
            use = gr.Button("Compare its model in the other tabs")
        job_status = gr.Markdown()
        cancelled = gr.Markdown()
        curves = gr.Plot(label="Live training curves", elem_id="curves")
        table = gr.Dataframe(jobs_table(jobs), label="Jobs (newest first)", interactive=False)
        start.click(on_start, [ft_model, data, archive, ft_reduction, steps, ft_batch, device], [started, job, table],
                    api_name="start_finetune", concurrency_limit=1, concurrency_id="jobs")
        estimate.click(on_estimate, [ft_model, ft_reduction, steps, ft_batch, device], estimated,
                       api_name="estimate_finetune", **COMPUTE)
        cancel.click(on_cancel, job, cancelled, api_name="cancel_finetune", concurrency_limit=1,
                     concurrency_id="jobs")
        use.click(on_use, job, model, api_name="use_job_model")
        gr.Timer(poll_s).tick(on_poll, job, [table, job_status, curves, model], api_visibility="private")
        job.change(on_poll, job, [table, job_status, curves, model], api_name="job_status")

    with gr.Tab("Compactors"):
        gr.Markdown("Compactor row norms ‖Q_j‖ of q, k and v per head and of the FFN per block (the paper's Fig. 7), "
                    "with the masked set S shaded, for the job selected in the Fine-tune tab; and what plain global "
                    "selection, without head- or attention-level consistency, could remove at the same FLOPs "
                    "(the contrast of the paper's Tab. XI).")
        show = gr.Button("Show compactors of the selected job", variant="primary")
        summary = gr.Markdown()
        norms = gr.Plot(label="Compactor row norms")
        contrast = gr.Plot(label="CDCP vs global selection")
        show.click(on_compactors, job, [summary, norms, contrast], api_name="compactors", **COMPUTE)
    return on_load, None, [job, table, model]


def main() -> None:
    p = argparse.ArgumentParser(description="CAIT Studio")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--offline", action="store_true", help="do not try the Hugging Face Hub (random weights)")
    p.add_argument("--public", action=argparse.BooleanOptionalAction, default=None,
                   help="caps for anonymous visitors and no server paths (default: on on a Space or with "
                        "CAIT_PUBLIC=1)")
    a = p.parse_args()
    limits = Limits.for_environment(a.public)
    warning = host_warning(a.host, a.port, limits)
    if warning:
        print(warning, file=sys.stderr)
    studio = Studio(device=a.device, pretrained=not a.offline, jobs=JobManager(limits=limits))
    app = build_app(studio)
    queue = dict(max_size=16, default_concurrency_limit=1) if limits.public else dict(default_concurrency_limit=1)
    app.queue(**queue).launch(server_name=a.host, server_port=a.port,
                              max_file_size=f"{limits.max_upload_bytes // 1_000_000}mb" if limits.public else None)


if __name__ == "__main__":
    main()
