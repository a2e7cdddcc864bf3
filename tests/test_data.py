"""Step-indexed data: disjoint, reproducible batches per rank."""
from cait.data.datasets import StepBatchSampler


def test_step_batches_are_disjoint_across_ranks_and_reproducible():
    a = StepBatchSampler(10, 2, steps=6, rank=0, world=2, seed=1)
    b = StepBatchSampler(10, 2, steps=6, rank=1, world=2, seed=1)
    first_epoch = sum((a.batch(s) + b.batch(s) for s in range(2)), []) + a.batch(2)[:0]
    assert len(set(first_epoch)) == len(first_epoch) == 8
    assert list(StepBatchSampler(10, 2, steps=6, start=3, rank=0, world=2, seed=1)) == [a.batch(s) for s in (3, 4, 5)]
