"""Hugging Face datasets as data (``hf:NAME[:CONFIG][@SPLIT]``): parsing, a locally saved dataset training and
calibrating offline, unlabelled data taking the teacher's classes, and a clear error for what is not cached."""
import math

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import cait
from cait.data.calibration import calibration_images
from cait.data.datasets import DataError, build_datasets
from cait.data.hub import HubSpec
from cait.data.segmentation import build_segmentation_sets
from cait.data.synthetic import CLASSES, render
from cait.dense.train import SegmentConfig, segment
from cait.finetune.config import FinetuneConfig, FinetuneError
from cait.finetune.engine import finetune
from cait.finetune.records import EvalRecord, of_type
from cait.finetune.rundir import read_log
from cait.measure.accuracy import agreement


def _save(root, labelled=True, n_train=24, n_val=8, size=32):
    """A DatasetDict of synthetic shapes (train + validation) saved with save_to_disk, as a Hub download would be."""
    splits = {}
    for split, n in (("train", n_train), ("validation", n_val)):
        rows = [render(0, "train" if split == "train" else "val", i, size) for i in range(n)]
        data = {"image": [Image.fromarray(img) for img, _, _ in rows]}
        features = {"image": datasets.Image()}
        if labelled:
            data["label"] = [label for _, label, _ in rows]
            features["label"] = datasets.ClassLabel(names=list(CLASSES))
        splits[split] = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return f"hf:{root}"


def test_specs_parse_and_bad_ones_are_refused():
    assert HubSpec.parse("hf:frgfm/imagenette:320px@train") == HubSpec("frgfm/imagenette", "320px", "train")
    assert HubSpec.parse("hf:ILSVRC/imagenet-1k") == HubSpec("ILSVRC/imagenet-1k")
    assert str(HubSpec.parse("hf:a/b@validation")) == "hf:a/b@validation"
    for bad in ("hf:", "hf:a/b:", "hf:a/b@", "imagenet"):
        with pytest.raises(DataError, match="hf:NAME"):
            HubSpec.parse(bad)


def test_a_saved_dataset_gives_labelled_splits_and_calibration_images(tmp_path):
    spec = _save(tmp_path / "shapes")
    train, val, classes = build_datasets(spec, 32)
    assert classes == list(CLASSES) and (len(train), len(val)) == (24, 8)
    x, y = val[3]
    assert x.shape == (3, 32, 32) and y == render(0, "val", 3, 32)[1]
    model = cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0]
    a, b = calibration_images(spec, 5, model, seed=1), calibration_images(spec, 5, model, seed=1)
    assert a.shape == (5, 3, 32, 32) and torch.equal(a, b)
    with pytest.raises(DataError, match="24 images, 30 calibration images"):
        calibration_images(spec, 30, model)
    with pytest.raises(DataError, match="no split 'test'"):
        build_datasets(spec + "@test", 32)


def test_a_dataset_that_is_not_cached_is_named_in_a_clear_error():
    with pytest.raises(DataError, match="hf:nobody/no-such-dataset-cait"):
        build_datasets("hf:nobody/no-such-dataset-cait", 32)


def test_label_free_runs_train_and_calibrate_on_a_saved_dataset_offline(tmp_path):
    """--data hf:... with --labels none and --calibrate on the same dataset; unlabelled data takes the teacher's
    classes, reports agreement and KL without a top-1, and is refused for a labelled run."""
    teacher = cait.create_model(cait.TEST_MODEL, pretrained=False, num_classes=8)[0]
    teacher.cait_meta = cait.models.meta.ModelMeta(kind="teacher", classes=list(CLASSES))
    path = cait.save_pretrained(teacher, tmp_path / "teacher")
    for labelled in (True, False):
        spec = _save(tmp_path / f"shapes-{labelled}", labelled=labelled)
        out = tmp_path / f"run-{labelled}"
        final = finetune(FinetuneConfig(model=str(path), data=spec, labels="none", calibrate=4,
                                        calibration_data=spec, flops_reduction=0.5, steps=4, batch_size=4,
                                        eval_interval=2, log_interval=2, output=str(out), device="cpu", lr=1e-3))
        evals = of_type(read_log(out), EvalRecord)
        assert 0 <= evals[0].agreement <= 100 and math.isfinite(evals[0].kl) and evals[0].kl >= 0
        assert (final.top1_student is None) == (not labelled) and (evals[0].top1_student is None) == (not labelled)
        compact = cait.load_pretrained(out / "compact")
        assert compact.cait_meta.classes == list(CLASSES)
        again = agreement(compact, teacher, build_datasets(spec, 32)[1], torch.device("cpu"))  # the shipped twin's
        assert again.images == 8 and (again.agreement, again.kl) == pytest.approx((final.agreement, final.kl))
    with pytest.raises(FinetuneError, match="these images have no labels"):
        finetune(FinetuneConfig(model=str(path), data=spec, steps=2, batch_size=4, output=str(tmp_path / "x"),
                                device="cpu"))


def test_agreement_is_100_percent_and_zero_kl_only_for_the_same_predictions(tiny):
    a, b = tiny(0, num_classes=8), tiny(1, num_classes=8)
    data = [(torch.randn(3, 32, 32), 0) for _ in range(20)]
    same, other = agreement(a, a, data, torch.device("cpu"), batch_size=6), agreement(b, a, data, torch.device("cpu"))
    assert (same.agreement, same.images) == (100.0, 20) and same.kl == pytest.approx(0.0, abs=1e-6)
    assert other.kl > 1e-4
    x = torch.stack([d[0] for d in data])
    with torch.no_grad():
        expected = 100.0 * float((b(x).argmax(-1) == a(x).argmax(-1)).float().mean())
        kl = torch.nn.functional.kl_div(b(x).log_softmax(-1), a(x).log_softmax(-1), log_target=True,
                                        reduction="batchmean")
    assert other.agreement == pytest.approx(expected) and other.kl == pytest.approx(float(kl), rel=1e-4)


def _save_segmentation(root, n_train=16, n_val=8, size=32, bad=None):
    """Synthetic shapes with their class maps (``image`` + ``annotation`` Image columns, as ``scene_parse_150``)."""
    splits, every = {}, []
    for split, n in (("train", n_train), ("validation", n_val)):
        rows = [render(0, "train" if split == "train" else "val", i, size) for i in range(n)]
        masks = [(m.astype(np.uint8) * (label + 1)) for _, label, m in rows]
        every += masks
        if bad == "size" and split == "validation":
            masks[3] = masks[3][: size // 2]
        splits[split] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(img) for img, _, _ in rows], "annotation": [Image.fromarray(m) for m in masks]},
            features=datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()}))
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return f"hf:{root}", masks, every


def test_a_saved_segmentation_dataset_trains_a_probe_offline_and_bad_masks_are_named(tmp_path):
    spec, val_masks, every = _save_segmentation(tmp_path / "seg")
    train, val, classes = build_segmentation_sets(spec, 32, val_size=6)
    assert (len(train), len(val)) == (16, 6) and len(classes) == 1 + max(int(m.max()) for m in every) > 2
    x, y = val[2]
    assert x.shape == (3, 32, 32) and torch.equal(y, torch.from_numpy(val_masks[2].astype(np.int64)))
    model = timm.create_model(cait.TEST_MODEL, num_classes=8)
    backbone = str(cait.save_pretrained(model, tmp_path / "bb"))
    result = segment(SegmentConfig(backbone=backbone, data=spec, steps=4, batch_size=4, val_size=6, eval_interval=4,
                                   log_interval=2, output=str(tmp_path / "run"), device="cpu"))
    assert result.score.step == 4 and len(result.score.per_class_iou) == len(classes)
    bad, _, _ = _save_segmentation(tmp_path / "bad", bad="size")
    with pytest.raises(DataError, match=r"held-out row 3: 32×16, its image is 32×32"):
        build_segmentation_sets(bad, 32, val_size=8)
    with pytest.raises(DataError, match="second Image column"):
        build_segmentation_sets(_save(tmp_path / "cls"), 32)
    # A training mask beyond the checked rows with a class the checked ones lack stops the run by its row.
    train.classes = classes[:2]
    with pytest.raises(DataError, match=r"row \d+: class index \d+ is out of range"):
        [train[i] for i in range(len(train))]
