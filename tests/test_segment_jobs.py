"""Segmentation runs as background jobs: a fine-tune's twin segmented by a job, followed like any job, its segmenter
shown in the Segmentation tab; every field refused by name before anything is written; an uploaded set checked
mask by mask, and a refused upload leaves nothing behind."""
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

import cait
from cait.dense.records import SegmentTrainRecord
from cait.dense.segmenter import Segmenter
from cait.finetune.records import of_type
from cait.data.synthetic import held_out_sample
from cait.studio.jobs.manager import JobManager
from cait.studio.jobs.model import JobError, JobStatus
from cait.studio.jobs.views import job_view, jobs_table
from cait.studio.public import ArchiveError, Limits
from cait.studio.samples import Sample
from cait.studio.segmentation import JobSegmenters, segmentation_view
from test_jobs import FAST, wait_for
from test_jobs import managers  # noqa: F401  (the fixture, shared)

SEG = dict(steps=12, batch_size=4, train_size=16, val_size=8, eval_interval=6, log_interval=3, ckpt_interval=6,
           lr=3e-3)


def test_a_fine_tuned_twin_is_segmented_by_a_job_and_its_segmenter_is_shown(tmp_path, managers):  # noqa: F811
    jm = managers(tmp_path)
    twin = wait_for(jm, jm.submit(device="cpu", **FAST).id, lambda j, p: not j.status.active)
    assert twin.status is JobStatus.DONE, twin.message
    assert f"job:{twin.id}" in jm.job_models()
    job = jm.submit(device="cpu", kind="segment", backbone=f"job:{twin.id}", **SEG)
    assert job.kind == "segment" and job.args["backbone"].endswith(f"{twin.id}/run/compact")
    done = wait_for(jm, job.id, lambda j, p: not j.status.active)
    assert done.status is JobStatus.DONE, done.message
    assert done.message.startswith("done: held-out mIoU") and "after 12 steps" in done.message
    assert [r.step for r in of_type(jm.records(job.id), SegmentTrainRecord)] == [3, 6, 9, 12]
    assert jm.progress(job.id).step == 12 and [j.id for j in jm.finished()] == [twin.id]   # not a twin itself
    text, fig = job_view(jm, job.id)
    assert "Segmentation job" in text and "|S|" not in text and len(fig.data) == 2
    row = jobs_table(jm).set_index("job").loc[job.id]
    assert row["task"] == "segmentation" and row["model"] == f"job:{twin.id}" and row["step"] == "12/12"
    # The Segmentation tab offers it, and its masks come out at the twin's input size with the synthetic classes.
    segs = JobSegmenters(jm)
    assert [i for _, i in segs.available()] == [job.id]
    seg = segs.get(job.id)
    assert isinstance(seg, Segmenter) and seg.classes[0] == "background"
    image, mask, label = held_out_sample(0, 32)
    view = segmentation_view({job.id: seg}, [job.id], Sample(image, mask, label))
    assert view.truth is not None and view.masks[job.id][0].size == (32, 32)
    with pytest.raises(ValueError, match="not a finished segmentation job"):
        segs.get(twin.id)                                            # a fine-tune is no segmenter
    with pytest.raises(ValueError, match="not a finished segmentation job"):
        segs.get("../../etc")


@pytest.mark.parametrize("args, field", [
    (dict(steps=0), "Steps: 0 is not a whole number from 1"),
    (dict(steps=10.5), "Steps: 10.5 is not a whole number"),
    (dict(batch_size=True), "Batch size: True is not a whole number"),
    (dict(baseline="dropout"), "Baseline: 'dropout' is not one of none, tome"),
    (dict(segmentation_channels=48), "segmentation_channels: must be a multiple of 32"),
    (dict(backbone_lr=-1.0), "Backbone LR \\(end to end\\): -1.0 is outside"),
    (dict(merge="h1," * 200), "Layout: at most 200 characters"),
    (dict(backbone="job:20260101-000000-abcdefabcdef"), "Backbone: 'job:20260101-000000-abcdefabcdef' is not one "
                                                        "of your finished fine-tune jobs"),
    (dict(backbone="/nowhere"), "Backbone: '/nowhere' is neither"),
    (dict(output="/tmp/elsewhere"), "unknown segmentation options: output"),
    (dict(data="/nowhere"), "Data: .*no such data directory"),
    (dict(report_to="wandb"), "Report to: 'wandb' is not one of none, trackio, tensorboard"),
])
def test_every_bad_field_is_refused_by_name_and_nothing_is_written(tmp_path, args, field):
    jm = JobManager(tmp_path, poll_interval=0)
    with pytest.raises(JobError, match=field):
        jm.submit(device="cpu", kind="segment", **{**SEG, "backbone": cait.TEST_MODEL, **args})
    assert jm.list() == [] and [p for p in (tmp_path / "jobs").iterdir() if p.is_dir()] == []


def test_an_unknown_kind_is_refused(tmp_path):
    with pytest.raises(JobError, match="unknown job kind 'hack'"):
        JobManager(tmp_path, poll_interval=0).submit(device="cpu", kind="hack", **FAST)


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _segmentation_zip(path, bad_mask=False):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("set/classes.json", json.dumps(["background", "blob"]))
        for split in ("train", "val"):
            for i in range(4):
                z.writestr(f"set/{split}/images/{i}.png", _png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
                mask = np.zeros((32, 32) if not (bad_mask and split == "val" and i == 2) else (30, 32), np.uint8)
                mask[8:20, 8:20] = 1
                z.writestr(f"set/{split}/masks/{i}.png", _png(mask))
    return path


def test_public_upload_is_checked_mask_by_mask_and_a_refusal_leaves_nothing(tmp_path):
    jm = JobManager(tmp_path / "runs", poll_interval=0, limits=Limits(public=True, max_steps=50, max_batch_size=8))
    bad = _segmentation_zip(tmp_path / "bad.zip", bad_mask=True)
    with pytest.raises(JobError, match=r"Data: the uploaded set: 1 problem\(s\): 2\.png: 32×30, its image is 32×32"):
        jm.submit_archive(bad, owner="s1", visitor="v1", kind="segment", backbone="bundled:original", **SEG)
    uploads = tmp_path / "runs" / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []       # the unpacked set is gone
    with pytest.raises(JobError, match="Steps: 60 is not a whole number from 1 to 50 on this public Space"):
        jm.submit_archive(bad, owner="s1", visitor="v1", kind="segment", backbone="bundled:original",
                          **{**SEG, "steps": 60})
    assert not uploads.exists() or list(uploads.iterdir()) == []       # refused before anything was unpacked
    with pytest.raises(ArchiveError, match="not a .zip"):
        (tmp_path / "x.zip").write_bytes(b"nope")
        jm.submit_archive(tmp_path / "x.zip", owner="s1", visitor="v1", kind="segment", backbone="bundled:original",
                          **SEG)
    assert list(uploads.iterdir()) == []
    with pytest.raises(JobError, match="paths are not accepted"):
        jm.submit(owner="s1", visitor="v1", kind="segment", backbone=str(tmp_path), **SEG)
    good = _segmentation_zip(tmp_path / "good.zip")
    job = jm.submit_archive(good, owner="s1", visitor="v1", kind="segment", backbone=cait.TEST_MODEL, **SEG)
    assert job.upload and (uploads / job.upload / "set" / "classes.json").is_file()
    assert job.data_label() == "uploaded archive"
    jm.cancel(job.id, owner="s1")
