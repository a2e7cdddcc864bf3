"""The Segmentation tab's engine: bundled segmenters found and loaded by name, masks on a sample (with the true mask
for synthetic ones), the shipped per-class IoU, and their cost measured in one run."""
import copy

import numpy as np
import pytest
import torch
from conftest import randomize_

import cait
from cait.baselines.token_pruning import apply_token_pruning
from cait.baselines.tome import apply_tome
from cait.data.photos import SAMPLE_PHOTOS
from cait.data.synthetic import CLASSES as SYNTHETIC_CLASSES
from cait.dense.checkpoint import save_segmenter
from cait.dense.records import SegmentEvalRecord
from cait.dense.segmenter import Segmenter
from cait.studio.public import Limits
from cait.studio.samples import SYNTHETIC_SAMPLES, load_sample
from cait.measure.speed import Spread
from cait.studio.segmentation import LABELS, BundledSegmenters, segmentation_view, segmenter_cost

CLASSES = ["background"] + list(SYNTHETIC_CLASSES)          # a job trained on a folder has its own


@pytest.fixture(scope="module")
def segs(tmp_path_factory):
    import timm
    torch.manual_seed(0)
    base = randomize_(timm.create_model(cait.TEST_MODEL, num_classes=8).eval(), std=0.05)
    backbones = {"original": base, "cait": cait.compress(base, 0.5), "tome": apply_tome(copy.deepcopy(base), 4),
                 "token_pruning": apply_token_pruning(copy.deepcopy(base), 0.5)}
    root = tmp_path_factory.mktemp("segmenters")
    for i, (name, bb) in enumerate(backbones.items()):
        score = SegmentEvalRecord(step=1, miou=10.0 + i, per_class_iou=[10.0 + i] * 9, pixel_accuracy=50.0)
        save_segmenter(Segmenter(bb, 9), root / name, classes=CLASSES, score=score)
    return BundledSegmenters(root)


def test_segmenters_are_found_in_order_and_refused_by_name(segs, tmp_path):
    assert segs.available() == list(LABELS)
    assert segs.get("tome") is segs.get("tome")                                 # loaded once
    with pytest.raises(ValueError, match="'nope' is not bundled here"):
        segs.get("nope")
    assert BundledSegmenters(tmp_path / "none").available() == []
    table = segs.scores()
    assert list(table.columns) == ["class"] + list(LABELS.values())
    assert list(table["class"]) == CLASSES + ["mIoU"] and table[LABELS["cait"]].iloc[-1] == 11.0


def test_a_synthetic_sample_shows_each_mask_and_the_true_one(segs):
    name = next(iter(SYNTHETIC_SAMPLES))
    sample = load_sample(name, None, 32, 10 ** 6)
    view = segmentation_view(segs, ["original", "cait", "token_pruning"], sample)
    assert set(view.masks) == {"original", "cait", "token_pruning"} and view.image.size == (32, 32)
    for image, annotations in view.masks.values():
        covered = sum(m for m, _ in annotations) if annotations else np.zeros((32, 32))
        assert covered.shape == (32, 32) and covered.max() <= 1                  # one class per pixel at most
        assert {label for _, label in annotations} <= set(CLASSES[1:])          # background is not drawn
    (_, truth) = view.truth
    from cait.data.synthetic import CLASSES as SHAPES
    assert [label for _, label in truth] == [CLASSES[1 + SHAPES.index(sample.label)]]
    assert np.array_equal(truth[0][0] > 0, sample.mask.numpy())
    assert set(view.colours) == set(CLASSES)
    photo = segmentation_view(segs, ["original"], load_sample(next(iter(SAMPLE_PHOTOS)), None, 32, 10 ** 8))
    assert photo.truth is None and photo.image.size == (32, 32)


def test_cost_is_measured_in_one_run_and_capped_in_public(segs):
    table = segmenter_cost(segs, ["original", "cait", "tome"], Limits(), batch_size=2)
    rows = {r["segmenter"]: r for r in table.to_dict("records")}
    assert list(rows) == [LABELS["original"], LABELS["cait"], LABELS["tome"]]
    assert rows["original"]["speed-up"] == "1.00 (1.00–1.00)"
    # Speed-ups are taken round by round, so the ratio of the median images/s lies within the speed-up's range.
    ratio = Spread.parse(rows[LABELS["cait"]]["images/s"]).median / Spread.parse(rows["original"]["images/s"]).median
    up = Spread.parse(rows[LABELS["cait"]]["speed-up"])
    slack = 0.01 + 0.05 * (1 + ratio) / Spread.parse(rows["original"]["images/s"]).median   # shown to 0.1
    assert up.low - slack <= ratio <= up.high + slack
    twin, original = rows[LABELS["cait"]], rows["original"]
    assert twin["backbone GFLOPs"] < original["backbone GFLOPs"] < original["segmenter GFLOPs"]
    assert {r["rounds"] for r in rows.values()} == {5}                          # locally: all rounds in budget
    with pytest.raises(ValueError, match="Batch size: 64 is outside 1 to 32 on this public Space"):
        segmenter_cost(segs, ["original"], Limits(public=True), batch_size=64)
    # Public: no round starts past the measuring budget (here none after the first).
    boxed = segmenter_cost(segs, ["original", "cait"], Limits(public=True, max_measure_seconds=0), batch_size=2)
    assert list(boxed["rounds"]) == [1, 1] and boxed["speed-up"].iloc[1].endswith("(1 round)")
