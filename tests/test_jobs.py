"""Background fine-tune jobs: life cycle, queue, cancel, killed processes, restarts; the app engine over them."""
import json
import os
import signal
import time

import pytest

import cait
from cait.data.synthetic import SyntheticShapes
from cait.finetune.records import TrainRecord, of_type
from cait.studio.attention import attention_view
from cait.studio.catalogue import ModelRef, job_label
from cait.studio.engine import Studio
from cait.studio.jobs.disk import job_bytes
from cait.studio.jobs.manager import JobManager
from cait.studio.jobs.model import Job, JobStatus
from cait.studio.jobs.store import tree_size
from cait.studio.jobs.views import compactor_view, job_view, jobs_table
from cait.studio.public import Limits
from cait.studio.samples import Sample

FAST = dict(model=cait.TEST_MODEL, steps=30, batch_size=8, val_size=32, synthetic_size=200, eval_interval=10,
            log_interval=5, ckpt_interval=10, lr=1e-3)
LONG = dict(FAST, steps=100000, eval_interval=100000, ckpt_interval=5)


@pytest.fixture
def managers():
    """JobManagers made by a test; every job they still run is cancelled at teardown, even after a failure."""
    made = []

    def make(root):
        made.append(JobManager(root, poll_interval=0))
        return made[-1]
    yield make
    for jm in made:
        for job in jm.list():
            if job.status in ("queued", "running"):
                jm.cancel(job.id)


def wait_for(jm, job_id, pred, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        jm.refresh()
        job = jm.get(job_id)
        if pred(job, jm.progress(job_id)):
            return job
        time.sleep(0.5)
    raise AssertionError(f"timed out; job is {jm.get(job_id).status}: {jm.get(job_id).message}")


def test_job_life_cycle_and_the_model_becomes_selectable(tmp_path, managers):
    jm = managers(tmp_path)
    job = jm.submit(device="cpu", **FAST)
    assert job.status == "running" and job.pid
    done = wait_for(jm, job.id, lambda j, p: j.status in ("done", "failed"))
    assert done.status is JobStatus.DONE, done.message
    assert "fewer FLOPs" in done.message
    # Progress came from the log: every 5th step, in order, to the last; a finished job has no ETA.
    assert [r.step for r in of_type(jm.records(job.id), TrainRecord)] == [5, 10, 15, 20, 25, 30]
    p = jm.progress(job.id)
    assert (p.step, p.steps, p.eta_s) == (30, 30, None) and p.elapsed_s > 1
    text, fig = job_view(jm, job.id)
    assert "done" in text and len(fig.data) >= 3
    assert jobs_table(jm).iloc[0]["status"] == "done"
    # What the public disk budget reserved for it covers what it wrote (its training states, teacher, compact model).
    written = tree_size(done.dir(jm.root))
    assert written <= job_bytes(done, Limits(public=True)) < 4 * written, (written, job_bytes(done, Limits()))

    studio = Studio(device="cpu", pretrained=False, jobs=jm)
    key = ModelRef.job(job.id).key
    assert (job_label(jm.get(job.id)), key) in studio.catalogue.choices()
    pair = studio.pair(key, 0.5, "")
    status = studio.status(pair)
    assert "fine-tuned with CDCP" in status and "above its teacher" not in status
    view = attention_view(pair, Sample(SyntheticShapes(4, 32, split="val").sample(0)[0]))
    assert set(view.compressed_top5) <= set(cait.data.synthetic.CLASSES)
    summary, norms, contrast = compactor_view(jm, job.id)
    assert "Plain global selection" in summary and len(norms.data) >= 4 and len(contrast.data) >= 3


def test_queue_cancel_and_killed_jobs(tmp_path, managers):
    jm = managers(tmp_path)
    first = jm.submit(device="cpu", **LONG)
    second = jm.submit(device="cpu", **LONG)
    assert jm.get(first.id).status == "running" and jm.get(second.id).status == "queued"   # one per device
    wait_for(jm, first.id, lambda j, p: p.step >= 10)
    message = jm.cancel(first.id)
    assert jm.get(first.id).status == "cancelled"
    assert "cancelled at step" in message and "kept: training state" in message
    with pytest.raises(ProcessLookupError):
        os.kill(first.pid, 0)
    # The queued job starts once the device is free; kill it from outside: it shows as failed with its log tail.
    running = wait_for(jm, second.id, lambda j, p: j.status == "running" and p.step >= 5)
    os.killpg(running.pid, signal.SIGKILL)
    failed = wait_for(jm, second.id, lambda j, p: j.status != "running", timeout=30)
    assert failed.status == "failed" and "exit code" in failed.message
    assert jm.cancel(second.id) == f"job {second.id} is already failed"


def test_jobs_survive_a_restart_and_dead_processes_are_noticed(tmp_path, managers):
    jm = managers(tmp_path)
    job = jm.submit(device="cpu", **FAST)
    wait_for(jm, job.id, lambda j, p: j.status != "running")
    # A job the previous app left "running" whose process is gone (pid 999999 does not exist).
    ghost = Job(id="20000101-000000-dead", args=dict(FAST), status="running", pid=999999, created=1.0, started=2.0)
    (tmp_path / "jobs" / ghost.id).mkdir(parents=True)
    (tmp_path / "jobs" / ghost.id / "stdout.log").write_text("Traceback ...\nMemoryError\n")
    (tmp_path / "jobs" / ghost.id / "job.json").write_text(json.dumps(ghost.__dict__))
    again = managers(tmp_path)                                       # the app is rebuilt
    assert [j.id for j in again.list()] == [job.id, ghost.id]
    assert again.get(job.id).status == "done"
    dead = again.get(ghost.id)
    assert dead.status == "failed" and "its process is gone" in dead.message and "MemoryError" in dead.message


def test_submit_refuses_unknown_options(tmp_path):
    with pytest.raises(ValueError, match="unknown fine-tune options: colour"):
        JobManager(tmp_path, poll_interval=0).submit(colour="red")


def test_a_label_free_job_without_trained_teacher_weights_is_refused_at_start(tmp_path, monkeypatch):
    """The tiny test DeiT has no published weights, and DeiT-Tiny's are neither cached nor reachable offline: Start
    says so in the app's words, and nothing is queued (it used to fail 6 s into the job with a command-line hint)."""
    import gradio as gr

    import cait.models.deit as deit
    from cait.studio.engine import Studio
    from cait.studio.jobs.manager import JobManager
    from cait.studio.ui.finetune_tab import FINETUNE_MODELS, TARGETS, _Handlers
    jobs = JobManager(tmp_path / "runs")
    studio = Studio(device="cpu", pretrained=False, bundled=None, jobs=jobs, segmenters=None)
    handlers = _Handlers(studio, FINETUNE_MODELS)
    label_free = next(k for k, v in TARGETS.items() if v == "none")
    tiny_test = next(k for k, v in FINETUNE_MODELS.items() if v == cait.TEST_MODEL)
    with pytest.raises(gr.Error, match="teach only with trained weights, and deit_test_patch4_32 has no published"):
        handlers.on_start(tiny_test, label_free, "synthetic", None, 0.5, 4, 8, "cpu", 128, 256, None)
    monkeypatch.setattr(deit, "cached_weights", lambda name: None)
    monkeypatch.setattr(studio.catalogue, "hub_reason", lambda: "huggingface.co unreachable")
    deit_t = next(k for k, v in FINETUNE_MODELS.items() if v == "deit_tiny_patch16_224")
    with pytest.raises(gr.Error, match="not in the local cache and the Hub is out of reach"):
        handlers.on_start(deit_t, label_free, "synthetic", None, 0.5, 4, 8, "cpu", 128, 256, None)
    assert jobs.list() == []
