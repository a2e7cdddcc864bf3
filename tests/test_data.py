"""Step-indexed data: disjoint, reproducible batches per rank."""
from cait.data.datasets import StepBatchSampler


def test_step_batches_are_disjoint_across_ranks_and_reproducible():
    a = StepBatchSampler(10, 2, steps=6, rank=0, world=2, seed=1)
    b = StepBatchSampler(10, 2, steps=6, rank=1, world=2, seed=1)
    first_epoch = sum((a.batch(s) + b.batch(s) for s in range(2)), []) + a.batch(2)[:0]
    assert len(set(first_epoch)) == len(first_epoch) == 8
    assert list(StepBatchSampler(10, 2, steps=6, start=3, rank=0, world=2, seed=1)) == [a.batch(s) for s in (3, 4, 5)]


def test_photo_crops_are_unlabelled_and_a_pure_function_of_the_index():
    """--data photos: random crops of the bundled photos, the same image for the same (seed, split, index) whatever
    came before (a resumed run sees the same batches), other crops for other indices and for the held-out split."""
    import torch

    from cait.data.datasets import build_datasets
    train, val, classes = build_datasets("photos", 48, seed=3, synthetic_size=12, val_size=4)
    assert classes == [] and (len(train), len(val)) == (12, 4)
    first = train[7][0]
    _ = [train[i] for i in range(5)]
    again, label = train[7]
    assert first.shape == (3, 48, 48) and torch.equal(first, again) and label == 0
    assert not torch.equal(train[2][0], train[7][0]) and not torch.equal(val[2][0], train[2][0])


def test_a_folder_of_images_without_classes_is_unlabelled_data_with_a_fifth_held_out(tmp_path):
    """A label-free run's own images (``--data DIR`` without train/ and val/): any sub-folders, one in five held out
    (at most ``val_size``), training crops a pure function of the index, a broken file replaced by the next one."""
    import numpy as np
    import pytest
    import torch
    from PIL import Image

    from cait.data.datasets import DataError, build_datasets
    rng = np.random.default_rng(0)
    for i in range(12):
        d = tmp_path / "imgs" / ("nested" if i % 3 else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    train, val, classes = build_datasets(str(tmp_path / "imgs"), 32, seed=1, val_size=512)
    assert classes == [] and (len(train), len(val)) == (11, 2)         # 13 image files: 13 // 5 held out
    assert not {f.name for f in train.files} & {f.name for f in val.files}
    first, label = train[4]
    _ = [train[i] for i in range(len(train))]                          # every item readable, the broken one too
    assert first.shape == (3, 32, 32) and label == 0 and torch.equal(train[4][0], first)
    broken = [f.name for f in train.files + val.files].index("broken.jpg")
    ds = train if broken < len(train.files) else val
    i = broken if ds is train else broken - len(train.files)
    assert ds[i][0].shape == (3, 32, 32)
    assert len(build_datasets(str(tmp_path / "imgs"), 32, val_size=1)[1]) == 1
    (tmp_path / "few").mkdir()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "few" / "a.png")
    with pytest.raises(DataError, match="1 image files .* at least 5"):
        build_datasets(str(tmp_path / "few"), 32)
