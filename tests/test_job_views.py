"""What the Fine-tune tab shows of jobs: the table and one job's view, and in public mode nothing of another
visitor's data or log."""
import time

import pytest

from cait.studio.jobs.manager import JobManager
from cait.studio.jobs.model import Job, JobStatus
from cait.studio.jobs.views import _fmt_s, compactor_view, job_view, jobs_table
from cait.studio.public import Limits


def _job(i: int, owner: str, status: JobStatus, **kw) -> Job:
    return Job(id=time.strftime("%Y%m%d-%H%M%S-") + f"{i:012x}", args={"steps": 40, "data": f"/srv/data/{owner}",
                                                                           "flops_reduction": 0.5},
               status=status, owner=owner, created=1000.0 + i, message=f"secret of {owner}\nsecond line", **kw)


@pytest.fixture
def jobs(tmp_path):
    jm = JobManager(tmp_path, poll_interval=0, limits=Limits(public=True))
    for i, (owner, status) in enumerate([("alice", JobStatus.DONE), ("bob", JobStatus.FAILED)]):
        jm.store.save(_job(i, owner, status))
    return jm


def test_public_table_shows_a_visitor_only_their_own_paths_and_messages(jobs):
    table = jobs_table(jobs, viewer="alice")
    rows = {r["status"]: r for r in table.to_dict("records")}
    assert rows["done"]["data"] == "/srv/data/alice" and rows["done"]["message"] == "secret of alice"
    assert rows["failed"]["data"] == "(not shown)" and rows["failed"]["message"] == ""
    assert list(table["job"]) == [j.id for j in jobs.list()]                            # newest first


def test_a_jobs_view_hides_another_visitors_log(jobs):
    bob = next(j for j in jobs.list() if j.owner == "bob")
    text, _ = job_view(jobs, bob.id, viewer="alice")
    assert "**failed**" in text and "step 0/40" in text and "secret" not in text
    assert "secret of bob" in job_view(jobs, bob.id, viewer="bob")[0]


def test_a_queued_job_says_it_waits_and_one_without_state_has_no_compactors(tmp_path):
    jm = JobManager(tmp_path, poll_interval=0)
    queued = _job(7, "carol", JobStatus.QUEUED)
    jm.store.save(queued)
    assert "Waiting for its device to be free" in job_view(jm, queued.id)[0]
    with pytest.raises(ValueError, match="no training state yet"):
        compactor_view(jm, queued.id)
    with pytest.raises(KeyError, match="is not a job id"):
        job_view(jm, "../../etc/passwd")


def test_durations_read_as_clocks_with_days():
    assert (_fmt_s(None), _fmt_s(59), _fmt_s(3723), _fmt_s(90000)) == ("–", "00:00:59", "01:02:03", "1 d 01:00:00")


def test_a_label_free_estimate_times_its_own_step_and_adds_the_calibration(tmp_path, monkeypatch):
    """A label-free job is timed as it runs (calibrated twin, soft targets, bf16 on the CPU) and cached under its own
    key; its total adds two passes over the calibration images."""
    import json

    import cait
    import cait.studio.jobs.views as views
    cache = tmp_path / "times.json"
    labelled = views.finetune_estimate(cait.TEST_MODEL, 10, 4, 0.5, "cpu", val_size=8, evals=1, cache=cache)
    free = views.finetune_estimate(cait.TEST_MODEL, 10, 4, 0.5, "cpu", val_size=8, evals=1, cache=cache,
                                   calibrate=64)
    assert "a step with CDCP's compactors" in labelled and "calibrating the twin on 64 images" not in labelled
    from cait.measure.precision import cpu_has_bf16_units
    step = "a label-free step in bf16" if cpu_has_bf16_units() else "a label-free step"   # as the job would run here
    assert f"{step} from the calibrated twin" in free and "calibrating the twin on 64 images" in free
    keys = [json.loads(k) for k in json.loads(cache.read_text())]
    assert sorted(len(k) for k in keys) == [5, 6] and ["label-free"] in [k[5:] for k in keys]
    # The total is steps × step + evaluations + 2 × 64 images of calibration, from the cached step time.
    monkeypatch.setattr(views, "_step_seconds", lambda *a: pytest.fail("a cached setting was timed again"))
    cache.write_text(json.dumps({json.dumps(k): 0.8 for k in keys}))
    free = views.finetune_estimate(cait.TEST_MODEL, 10, 4, 0.5, "cpu", val_size=8, evals=1, cache=cache,
                                   calibrate=64)
    assert f"about {_fmt_s(10 * 0.8 + 0.2 / 3 * 8 + 2 * 0.2 * 64)}" in free
    # As the form changes the estimate comes from the cache alone: a timed setting answers, an untimed one says so.
    assert views.finetune_estimate(cait.TEST_MODEL, 10, 4, 0.5, "cpu", val_size=8, evals=1, cache=cache,
                                   calibrate=64, cached_only=True) == free
    with pytest.raises(LookupError, match="not been timed"):
        views.finetune_estimate(cait.TEST_MODEL, 10, 6, 0.5, "cpu", cache=cache, cached_only=True)


def test_a_label_free_job_s_views_show_what_it_measured_and_pruned(tmp_path):
    """A label-free job that starts from a calibrated twin trains no compactors: its views say it pruned before
    training (|S| stays 0 by design, not "nothing pruned"), give its held-out agreement with its n, draw the FLOPs
    target on an axis from zero, and the Compactors tab shows the channels it kept instead of an error."""
    import json

    import torch

    import cait
    from cait.finetune import FinetuneConfig, finetune
    torch.manual_seed(0)
    teacher = cait.save_pretrained(cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0],
                                   tmp_path / "teacher")
    jm = JobManager(tmp_path / "runs", poll_interval=0)
    job = _job(3, "dana", JobStatus.DONE)
    jm.store.save(job)
    summary = finetune(FinetuneConfig(model=str(teacher), data="synthetic", labels="none", calibrate=16,
                                      flops_reduction=0.5, merge="none", steps=4, batch_size=4, val_size=16,
                                      synthetic_size=64, eval_interval=2, log_interval=1, ckpt_interval=2,
                                      device="cpu", output=str(jm.run_dir(job.id))))
    assert summary.held_out == 16 and summary.s_size == 0
    text, fig = job_view(jm, job.id)
    assert "pruned before training (calibrated twin" in text and "|S| 0" not in text
    assert "Held-out at step 4 (n = 16): top-1" in text and "agreement with the teacher" in text
    titles = [a.text for a in fig.layout.annotations]
    assert "|S| empty: pruned before training (calibrated)" in titles and "top-1 / agreement (%)" in titles
    agreement = next(t for t in fig.data if t.name == "agreement with teacher")
    assert list(agreement.x)[-1] == 4 and list(agreement.y)[-1] == summary.agreement   # the final score is plotted
    assert fig.layout.yaxis3.range[0] == 0                                      # FLOPs from zero, not a sliver
    text, kept, contrast = compactor_view(jm, job.id)
    assert "started from a calibrated twin" in text and "no compactors" in text and contrast is None
    bars = {t["name"]: t["y"] for t in json.loads(kept.to_json())["data"] if t["type"] == "bar"}
    assert min(min(y) for y in bars.values()) < 100                              # it did prune, and it shows
    assert str(tmp_path) not in text
