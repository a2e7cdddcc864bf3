"""The typed records that cross modules: log lines (writer and readers), layouts, model identities, job statuses."""
import dataclasses
import json

import pytest

from cait.finetune.records import (RECORD_TYPES, EvalRecord, FinalRecord, StartRecord, StoppedRecord, TrainRecord,
                                   from_json, of_type, to_dict, to_json)
from cait.models.layout import MAX_LAYOUT_CHARS, Layout, format_layout, parse_layout
from cait.models.meta import FinetuneSummary
from cait.studio.catalogue import ModelRef
from cait.studio.jobs.model import Job, JobStatus

SAMPLES = [
    StartRecord(config={"steps": 30}, teacher="random", distill_alpha=0.0, merge="h2,v4", base_flops=10, atme_flops=8,
                target_flops=5, classes=8, world_size=1, device="cpu"),
    TrainRecord(step=10, epoch=0.5, loss=2.1, lr=1e-4, flops_target=None, s_size=0, s_entered=0, max_masked_norm=0.0,
                images_per_s=12.5),
    EvalRecord(step=10, top1_student=40.0, top1_teacher=None),
    StoppedRecord(step=20),
    FinalRecord(step=30, merge="h2,v4", base_flops=10, flops=5, flops_reduction=0.5, top1_student=41.0,
                top1_masked=41.0, top1_teacher=None, max_removed_row_norm=0.0, s_size=12),
]


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: r.TYPE)
def test_every_log_record_round_trips_through_its_line(record):
    line = to_json(record)
    assert json.loads(line)["type"] == record.TYPE
    assert from_json(json.loads(line)) == record


def test_one_record_class_per_kind_and_selection_by_class():
    import cait.dense.records  # noqa: F401  (registers the segmentation engine's kinds, as any reader of its logs does)
    assert set(RECORD_TYPES) == {"start", "train", "eval", "stopped", "final", "segment_start", "segment_train",
                                 "segment_eval"}
    assert of_type(SAMPLES, TrainRecord) == [SAMPLES[1]] and of_type(SAMPLES, FinalRecord) == [SAMPLES[4]]


def test_the_mask_stays_out_of_the_log_line_and_the_summary_is_what_a_model_keeps():
    final = dataclasses.replace(SAMPLES[4], mask={"qk": [[[0, 1]]], "v": [], "ffn": []})
    assert "mask" not in to_dict(final) and "mask" not in to_dict(StoppedRecord(step=3, mask={"qk": []}))
    summary = final.summary()
    assert type(summary) is FinetuneSummary and summary == FinetuneSummary(**{
        f.name: getattr(final, f.name) for f in dataclasses.fields(FinetuneSummary)})


def test_unknown_kinds_are_skipped_and_incomplete_records_refused():
    assert from_json({"type": "someday", "step": 1}) is None and from_json(["not", "a", "record"]) is None
    with pytest.raises(ValueError, match="log record of type 'train' is incomplete"):
        from_json({"type": "train", "step": 1})


def test_a_layout_is_one_immutable_hashable_value():
    layout = Layout.parse("h4, V8")
    assert layout == {4: "h", 8: "v"} and {4: "h", 8: "v"} == layout and str(layout) == "h4,v8"
    assert layout == Layout.parse({8: "v", 4: "h"}) and hash(layout) == hash(Layout.parse("h4,v8"))
    assert {layout: 1}[Layout({4: "h", 8: "v"})] == 1                   # a cache key, as the app uses it
    assert Layout.parse(layout) is layout and Layout() == {} and str(Layout()) == "" and not Layout()
    assert parse_layout(None) == Layout() and format_layout({7: "v", 4: "h"}) == "h4,v7"
    assert list(layout) == [4, 8] and layout.grids((14, 14), 12)[8] == (7, 7)
    with pytest.raises(TypeError):
        layout[5] = "h"                                                   # immutable
    with pytest.raises(ValueError, match=f"at most {MAX_LAYOUT_CHARS} characters"):
        Layout.parse("h1," * 1000)                                        # a long field is refused, not parsed
    with pytest.raises(ValueError, match="direction for block 3 must be 'h' or 'v'"):
        Layout({3: "x"})


@pytest.mark.parametrize("key", ["deit:deit_small_patch16_224", "bundled", "job:20261201-101500-ab12cd34ef56",
                                 "timm:vit_small_patch14_reg4_dinov2", "hf-hub:someone/vit@v1", "vit_base_patch16_224"])
def test_a_model_key_names_one_model(key):
    ref = ModelRef.parse(key)
    assert ref.key == key and ModelRef.parse(ref.key) == ref


@pytest.mark.parametrize("key, why", [("DeiT-Small", "is not in the list"), ("deit:resnet50", "is not in the list"),
                                      ("job:../../etc", "is not a job id"), ("bundled:x", "is not in the list"),
                                      ("", "is not in the list")])
def test_anything_else_is_refused_by_name(key, why):
    with pytest.raises(ValueError, match=f"^Model: .*{why}"):
        ModelRef.parse(key)


def test_job_status_is_stored_as_its_value_and_knows_what_is_active():
    job = Job(id="20261201-101500-ab12cd34ef56", args={}, status="running")
    assert job.status is JobStatus.RUNNING and job.status == "running" and str(job.status) == "running"
    assert [s.value for s in JobStatus if s.active] == ["queued", "running"]
    with pytest.raises(ValueError):
        Job(id=job.id, args={}, status="paused")
