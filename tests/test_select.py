"""Choosing S (Alg. 1–3): FLOPs target, head-level and attention-level consistency, rounding."""
import pytest
import timm
import torch

import cait
from cait.models.spec import describe
from cait.compress.importance import ChannelScores
from cait.compress.select import ChannelMask


@pytest.fixture(scope="module")
def deit_s_selection():
    model = cait.apply_atme(timm.create_model("deit_small_patch16_224").eval(), "h4,v7")
    spec = describe(model)
    target = int(0.45 * 4_598_882_304)
    return spec, target, cait.select_channels(cait.weight_scores(model), spec, target)


def test_selection_meets_target_and_is_consistent_in_every_block(deit_s_selection):
    spec, target, mask = deit_s_selection
    mask.check_consistency()
    widths = mask.widths()
    pruned = spec.with_widths(widths)
    assert pruned.flops() <= target
    # It stops as soon as the target is met: the last step is at most one head-consistent unit (H units).
    worst_step = max(b.heads * b.qk_unit_flops() for b in spec.blocks)
    assert target - pruned.flops() < worst_step
    for l, (qk, v, f) in enumerate(widths):
        assert 1 <= qk <= 64 and 1 <= v <= 64 and 1 <= f <= 1536
        assert int(mask.qk[l].sum()) == 6 * (64 - qk) and int(mask.v[l].sum()) == 6 * (64 - v)


def test_head_level_consistency_pulls_each_other_heads_lowest_unit():
    # One block, 2 heads of 4, FFN 2. Head 0 has the globally lowest v score; head 1's lowest v is channel 2.
    from cait.models.spec import BlockSpec, ModelSpec
    spec = ModelSpec((BlockSpec(tokens=5, dim=8, heads=2, qk_dim=4, v_dim=4, ffn_dim=2),), 0, 0)
    big = torch.full((2, 4), 10.0)
    v = torch.tensor([[0.1, 5.0, 6.0, 7.0], [3.0, 4.0, 2.0, 9.0]])
    scores = ChannelScores(q=[big], k=[big], v=[v], ffn=[torch.tensor([20.0, 20.0])])
    one_v_step = 2 * spec.blocks[0].v_unit_flops()
    mask = cait.select_channels(scores, spec, spec.flops() - one_v_step)
    assert mask.v[0].tolist() == [[True, False, False, False], [False, False, True, False]]
    assert not mask.qk[0].any() and not mask.ffn[0].any()


def test_attention_level_consistency_scores_qk_pairs_by_their_mean():
    # q_0 is tiny but k_0 is large; pair 1 has the lowest mean: it goes first, and q and k go together.
    from cait.models.spec import BlockSpec, ModelSpec
    spec = ModelSpec((BlockSpec(tokens=5, dim=8, heads=1, qk_dim=3, v_dim=3, ffn_dim=2),), 0, 0)
    q = torch.tensor([[0.01, 1.0, 5.0]])
    k = torch.tensor([[9.0, 1.0, 5.0]])
    big = torch.full((1, 3), 50.0)
    scores = ChannelScores(q=[q], k=[k], v=[big], ffn=[torch.tensor([50.0, 50.0])])
    mask = cait.select_channels(scores, spec, spec.flops() - spec.blocks[0].qk_unit_flops())
    assert mask.qk[0].tolist() == [[False, True, False]]


def test_selection_respects_min_channels_and_refuses_impossible_targets(tiny):
    model = tiny()
    spec = describe(model)
    scores = cait.weight_scores(model)
    with pytest.raises(ValueError, match="out of reach"):
        cait.select_channels(scores, spec, 1000)
    floor = spec.with_widths([(4, 4, 4)] * 6).flops()
    mask = cait.select_channels(scores, spec, floor, min_channels=4)
    assert mask.widths() == [(4, 4, 4)] * 6


def test_selection_is_rebuilt_from_scores_so_a_recovered_channel_comes_back(tiny):
    model = tiny()
    spec = describe(model)
    scores = cait.weight_scores(model)
    target = int(0.8 * spec.flops())
    first = cait.select_channels(scores, spec, target)
    l, j = next((l, int(m.nonzero()[0])) for l, m in enumerate(first.ffn) if m.any())
    scores.ffn[l][j] = 1e6                                                    # that channel's score recovered
    second = cait.select_channels(scores, spec, target)
    assert not second.ffn[l][j]


def test_mask_dict_round_trip(tiny):
    model = tiny()
    mask = cait.select_channels(cait.weight_scores(model), describe(model), int(0.7 * cait.analytic_flops(model)))
    again = ChannelMask.from_dict(mask.to_dict())
    assert all(torch.equal(a, b) for a, b in zip(mask.qk + mask.v + mask.ffn, again.qk + again.v + again.ffn))


@pytest.mark.parametrize("multiple", [4, 8])
def test_rounded_widths_are_multiples_consistent_and_meet_the_target(multiple):
    model = cait.apply_atme(timm.create_model("deit_small_patch16_224").eval(), "h4,v7")
    spec = describe(model)
    target = int(0.45 * 4_598_882_304)
    scores = cait.weight_scores(model)
    exact = cait.select_channels(scores, spec, target)
    rounded = cait.select_channels(scores, spec, target, round_to=multiple)
    widths = rounded.widths()                                       # raises if heads disagree
    assert all(w % multiple == 0 for block in widths for w in block)
    assert spec.with_widths(widths).flops() <= target
    # Rounding to the nearest multiple costs little: attention widths move by at most one multiple; FFN groups,
    # cheap per channel, absorb the compensating step-downs (at most three multiples).
    for (q0, v0, f0), (q1, v1, f1) in zip(exact.widths(), widths):
        assert abs(q1 - q0) <= multiple and abs(v1 - v0) <= multiple and abs(f1 - f0) <= 3 * multiple
    assert spec.with_widths(widths).flops() > 0.97 * target
