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

import gradio as gr

from cait.jobs import JobError, JobManager
from cait.models import TEST_MODEL
from cait.public import ArchiveError, Limits, extract_archive, on_space, visitor_key
from cait.studio import Studio, compactor_view, job_view, jobs_table

LOOPBACK = ("127.0.0.1", "localhost", "::1")
COMPUTE = dict(concurrency_id="compute", concurrency_limit=1)
"""Heavy events share one worker: a visitor cannot start two model passes at once, nor can two visitors."""

DEFAULT_REDUCTION = 0.5
FINETUNE_MODELS = {f"tiny test DeiT (32 px, {TEST_MODEL}): about a minute on a CPU": TEST_MODEL,
                   "DeiT-Tiny (224 px)": "deit_tiny_patch16_224", "DeiT-Small (224 px)": "deit_small_patch16_224",
                   "DeiT-Base (224 px)": "deit_base_patch16_224"}


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


def build_app(studio: Studio | None = None, poll_s: float = 2.0) -> gr.Blocks:
    """The Gradio Blocks UI over a :class:`cait.studio.Studio` (one with a job manager is created if not given)."""
    studio = studio or Studio(jobs=JobManager())
    jobs = studio.jobs

    def pair(model, reduction, merge):
        try:
            return studio.pair(model, reduction, merge)
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def on_build(model, reduction, merge):
        p = pair(model, reduction, merge)
        depth = len(p.original.blocks)                     # the block slider follows the model (6 for the tiny DeiT)
        return studio.status(p), gr.update(maximum=depth, value=depth)

    def on_attention(model, reduction, merge, sample, upload, block):
        p = pair(model, reduction, merge)
        try:
            v = studio.attention(p, studio.image(sample, upload), int(block) - 1, sample=sample)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return (v.original_mean, v.compressed_mean, v.original_heads, v.compressed_heads, v.original_top5,
                v.compressed_top5, v.localisation_text())

    def on_channels(model, reduction, merge):
        return studio.channels(pair(model, reduction, merge))

    def on_cost(model, reduction, merge, measure, batch_size):
        try:
            return studio.cost(pair(model, reduction, merge), measure=measure, batch_size=int(batch_size))
        except ValueError as e:
            raise gr.Error(str(e)) from None

    public = studio.limits.public
    # Public: Gradio's own upload cache is emptied of files over an hour old, every 10 minutes.
    with gr.Blocks(title="CAIT Studio", delete_cache=(600, 3600) if public else None) as demo:
        gr.Markdown("# CAIT Studio\nA DeiT next to its CAIT twin: asymmetric token merging (ATME) + consistent "
                    "dynamic channel pruning (CDCP).")
        with gr.Row():
            model = gr.Dropdown(list(studio.model_choices()), value=studio.default_model(), label="Model",
                                info="the bundled offline pair, DeiTs (timm ImageNet weights), then finished "
                                     "fine-tune jobs")
            reduction = gr.Slider(0.05, 0.8, value=DEFAULT_REDUCTION, step=0.01, label="Total FLOPs reduction")
            merge = gr.Textbox(label="ATME layout (optional)", placeholder="planned; or e.g. h4,v7 (0-based blocks)")
            build = gr.Button("Build CAIT twin", variant="primary")
        status = gr.Markdown(studio.startup_note())
        settings = [model, reduction, merge]

        with gr.Tab("Attention"):
            with gr.Row():
                sample = gr.Dropdown(studio.sample_names(), value=studio.default_sample(),
                                     label="Bundled photo or synthetic sample")
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
            localisation = gr.Markdown()
            show.click(on_attention, settings + [sample, upload, block],
                       [orig_mean, comp_mean, orig_heads, comp_heads, orig_top5, comp_top5, localisation],
                       api_name="attention", **COMPUTE)

        with gr.Tab("Channels"):
            gr.Markdown("Channels each block keeps after CDCP, as a share of the original (the paper's Fig. 6). "
                        "All heads of a block keep the same q/k and v widths (head-level consistency).")
            show_channels = gr.Button("Show retained channels", variant="primary")
            channels_plot = gr.Plot(label="Retained channels")
            show_channels.click(on_channels, settings, channels_plot, api_name="channels", **COMPUTE)

        with gr.Tab("Cost"):
            gr.Markdown("FLOPs are fvcore's, one multiply-add = one FLOP, attention matmuls included. Throughput is "
                        "measured on the device above, both models alternately, same input.")
            with gr.Row():
                measure = gr.Checkbox(value=True, label="Measure throughput")
                batch_size = gr.Slider(1, studio.limits.max_cost_batch if public else 256, value=8, step=1,
                                       label="Batch size")
                show_cost = gr.Button("Compute cost", variant="primary")
            cost_df = gr.Dataframe(label="Cost")
            flops_plot = gr.Plot(label="FLOPs per block")
            show_cost.click(on_cost, settings + [measure, batch_size], [cost_df, flops_plot], api_name="cost",
                            **COMPUTE)

        if jobs is not None:
            _finetune_tabs(studio, jobs, model, poll_s)

        build.click(on_build, settings, [status, block], api_name="build", **COMPUTE)
        demo.load(on_build, settings, [status, block], api_visibility="private", **COMPUTE)
    return demo


def _finetune_tabs(studio: Studio, jobs: JobManager, model: gr.Dropdown, poll_s: float) -> None:
    """The Fine-tune and Compactors tabs (inside the Blocks context)."""
    public = jobs.limits.public
    models = {k: v for k, v in FINETUNE_MODELS.items() if not public or v in jobs.limits.models}

    def job_ids():
        return [j.id for j in jobs.list(limit=50)]

    def on_start(ft_model, data, archive, reduction, steps, batch_size, device, request: gr.Request):
        owner, visitor = _visitor(request)
        upload = None
        try:
            data = (data or "").strip() or "synthetic"
            if archive:
                upload, dest = jobs.new_upload()
                data = str(extract_archive(archive, dest, jobs.limits))
            job = jobs.submit(device=device, owner=owner, visitor=visitor, upload=upload,
                              model=models.get(ft_model, ft_model), data=data,
                              flops_reduction=float(reduction), steps=int(steps), batch_size=int(batch_size),
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
        label = next((k for k, v in studio.model_choices().items() if v == f"job:{job_id}"), None)
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
            ft_model = gr.Dropdown(list(models), value=next(iter(models)), label="Model")
            data = gr.Textbox("synthetic", label="Data",
                              info="'synthetic', or upload a .zip of train/<class>/ and val/<class>/ images"
                                   if public else "'synthetic' or an ImageFolder path on the server")
            archive = gr.File(label="…or an ImageFolder .zip (train/ and val/)", file_types=[".zip"],
                              type="filepath", height=100)
            ft_reduction = gr.Slider(0.0, 0.8, value=0.5, step=0.01, label="Total FLOPs reduction")
        with gr.Row():
            # No widget bounds: the server checks every field and names it in the error (cait.jobs.validate).
            steps = gr.Number(300, precision=0, label="Steps", info=f"1 to {jobs.limits.steps_cap():,}")
            ft_batch = gr.Number(32, precision=0, label="Batch size (even)", info=f"2 to {jobs.limits.batch_cap():,}")
            device = gr.Dropdown(devices, value=devices[0], label="Device")
            start = gr.Button("Start fine-tune", variant="primary")
        started = gr.Textbox(label="Started job", interactive=False)
        with gr.Row():
            job = gr.Dropdown(job_ids(), value=(job_ids() or [None])[0], label="Job", allow_custom_value=True)
            cancel = gr.Button("Cancel job", variant="stop")
            use = gr.Button("Compare its model in the other tabs")
        job_status = gr.Markdown()
        cancelled = gr.Markdown()
        curves = gr.Plot(label="Live training curves")
        table = gr.Dataframe(jobs_table(jobs), label="Jobs (newest first)", interactive=False)
        start.click(on_start, [ft_model, data, archive, ft_reduction, steps, ft_batch, device], [started, job, table],
                    api_name="start_finetune", concurrency_limit=1, concurrency_id="jobs")
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
