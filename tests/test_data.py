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
