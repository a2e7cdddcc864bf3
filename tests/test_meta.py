"""``model.cait_meta``: the typed record written by compress/finetune/ToMe and read by the app and the model card."""
import json

import pytest
import torch

import cait
from cait.models.meta import FinetuneSummary, ModelMeta, meta_of


def test_round_trip_through_json_keeps_unknown_keys():
    meta = ModelMeta(kind="finetuned", base_model="deit_tiny_patch16_224", merge="h5,v10", classes=["a", "b"],
                     finetune=FinetuneSummary(step=600, merge="h5,v10", base_flops=10, flops=5, flops_reduction=0.5,
                                              top1_student=90.0),
                     extra={"from_a_newer_version": [1, 2]})
    d = json.loads(json.dumps(meta.to_dict()))
    assert d["preview"] is False and d["from_a_newer_version"] == [1, 2]
    back = ModelMeta.from_dict(d)
    assert back == meta and back.fixed_by_training and back.finetune.top1_teacher is None


@pytest.mark.parametrize("legacy, kind", [
    ({"preview": True, "merge": "h2"}, "preview"),
    ({"preview": False, "calibration": {"images": 8}}, "calibrated"),
    ({"preview": False, "finetune": {"step": 1, "merge": "", "base_flops": 2, "flops": 1, "flops_reduction": 0.5,
                                     "top1_student": 50.0, "s_size": 3}}, "finetuned"),
    ({"role": "teacher", "source": "random", "classes": ["x"]}, "teacher"),
    ({}, "model"),
    (None, "model"),
])
def test_files_from_before_the_record_are_classified_by_what_they_hold(legacy, kind):
    meta = ModelMeta.from_dict(legacy)
    assert meta.kind == kind
    assert meta.preview == (kind == "preview")
    if kind == "finetuned":
        assert meta.finetune.s_size == 3


def test_unknown_kind_in_code_is_refused_but_read_from_disk_by_content():
    with pytest.raises(ValueError, match="kind"):
        ModelMeta(kind="distilled")
    assert ModelMeta.from_dict({"kind": "distilled", "calibration": {"images": 1}}).kind == "calibrated"


def test_compress_and_checkpoint_carry_the_record(tmp_path):
    torch.manual_seed(0)
    model, _ = cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=4)
    model.cait_meta = ModelMeta(kind="teacher", classes=["a", "b", "c", "d"])
    twin = cait.compress(model, 0.4, layout="")
    assert twin.cait_meta.kind == "preview" and twin.cait_meta.classes == ["a", "b", "c", "d"]
    assert twin.cait_meta.achieved_reduction >= 0.4 - 1e-6
    cait.save_pretrained(twin, tmp_path)
    loaded = cait.load_pretrained(tmp_path)
    assert loaded.cait_meta == twin.cait_meta
    assert meta_of(torch.nn.Linear(1, 1)) == ModelMeta()
