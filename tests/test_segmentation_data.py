"""Segmentation data: synthetic class maps, and a user's folder refused by name before any training."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cait.data.datasets import DataError
from cait.data.segmentation import (SYNTHETIC_SEG_CLASSES, SyntheticSegmentation, build_segmentation_sets,
                                    check_folder)
from cait.data.synthetic import SyntheticShapes


def test_synthetic_targets_are_the_object_mask_labelled_by_its_class():
    ds = SyntheticSegmentation(4, 48, split="val")
    for i in range(4):
        x, y = ds[i]
        _, label, mask = SyntheticShapes(4, 48, split="val").tensor(i)
        assert x.shape == (3, 48, 48) and y.dtype == torch.int64
        assert torch.equal(y, mask.long() * (label + 1)) and set(y.unique().tolist()) == {0, label + 1}
    assert len(SYNTHETIC_SEG_CLASSES) == 9 and SYNTHETIC_SEG_CLASSES[0] == "background"


def _folder(root, n=2, size=(20, 16), classes=None):
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.random.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / split / "images" / f"im{i}.jpg")
            m = np.zeros((size[1], size[0]), dtype=np.uint8)
            m[:, : size[0] // 2] = 2
            Image.fromarray(m).save(root / split / "masks" / f"im{i}.png")
    if classes:
        (root / "classes.json").write_text(json.dumps(classes))
    return root


def test_a_valid_folder_loads_resized_with_aligned_flips(tmp_path):
    root = _folder(tmp_path / "d", classes=["background", "road", "car"])
    train, val, classes = build_segmentation_sets(str(root), 32)
    assert classes == ["background", "road", "car"] and len(train) == len(val) == 2
    x, y = val[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and set(y.unique().tolist()) == {0, 2}
    assert bool((y[:, :16] == 2).all()) and bool((y[:, 16:] == 0).all())          # nearest: no blended indices
    flipped = 0
    for _ in range(20):
        _, y = train[0]
        flipped += bool((y[:, :16] == 0).all() and (y[:, 16:] == 2).all())
    assert 0 < flipped < 20                                                        # random flips, mask follows
    unnamed = _folder(tmp_path / "u")
    assert check_folder(unnamed)[1] == ["class_0", "class_1", "class_2"]           # from the largest index


@pytest.mark.parametrize("damage, message", [
    ("missing", "im1.jpg: no mask masks/im1.png"),
    ("jpeg", "im1.jpg: mask im1.jpg is not a PNG"),
    ("size", "im1.png: 9×9, its image is 20×16"),
    ("index", "im1.png: class index 7 is out of range (classes.json names 3 classes)"),
    ("rgb", "im1.png: a mask holds one class index per pixel (mode L or P), got mode RGB"),
    # Safe to host, part three, item 6: masks that passed the checks and failed at step 0.
    ("negative", "im1.png: not a PNG file (its content is TIFF)"),             # int32 TIFF named .png, -1
    ("jpeg-named-png", "im1.png: not a PNG file (its content is JPEG)"),
])
def test_bad_data_is_refused_by_name_before_training(tmp_path, damage, message):
    root = _folder(tmp_path / "d", classes=["background", "road", "car"])
    mask = root / "val" / "masks" / "im1.png"
    if damage == "missing":
        mask.unlink()
    elif damage == "jpeg":
        mask.unlink()
        Image.new("L", (20, 16)).save(root / "val" / "masks" / "im1.jpg")
    elif damage == "size":
        Image.new("L", (9, 9)).save(mask)
    elif damage == "index":
        Image.fromarray(np.full((16, 20), 7, dtype=np.uint8)).save(mask)
    elif damage == "rgb":
        Image.new("RGB", (20, 16)).save(mask)
    elif damage == "negative":
        Image.fromarray(np.full((16, 20), -1, dtype=np.int32)).save(mask, format="TIFF")
    elif damage == "jpeg-named-png":
        Image.new("L", (20, 16)).save(mask, format="JPEG")
    with pytest.raises(DataError, match="1 problem"):
        build_segmentation_sets(str(root), 32)
    with pytest.raises(DataError) as e:
        check_folder(root)
    assert message in str(e.value)


def test_a_negative_class_index_is_refused_wherever_masks_come_from():
    """Hub rows are checked by the same function: an int32 mask holding -1 is refused, not met at step 0 as
    ``IndexError: Target -1 is out of bounds``."""
    from cait.data.segmentation import _check_mask
    mask = Image.fromarray(np.full((4, 4), -1, dtype=np.int32))
    assert _check_mask("row 3", mask, (4, 4), 5)[0] == "row 3: class index -1 is negative (one index from 0 per pixel)"
    assert _check_mask("row 3", Image.fromarray(np.ones((4, 4), dtype=np.int32)), (4, 4), 5) == (None, 1)


def test_classes_json_is_read_with_a_depth_and_a_size_bound(tmp_path):
    """A classes.json nested 30,000 deep raised an uncaught RecursionError (a blank error in the browser); one of
    megabytes was read whole. Both are refused by name."""
    root = _folder(tmp_path / "d")
    (root / "classes.json").write_text("[" * 30_000 + "]" * 30_000)
    with pytest.raises(DataError, match="classes.json: not a JSON list of class names"):
        check_folder(root)
    (root / "classes.json").write_text(json.dumps(["x" * 1000] * 100))
    with pytest.raises(DataError, match="classes.json: larger than 64,000 bytes"):
        check_folder(root)


def test_a_folder_without_its_parts_says_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="no such data directory"):
        check_folder(tmp_path / "nowhere")
    (tmp_path / "d" / "train" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="masks: missing"):
        check_folder(tmp_path / "d")
