"""Layout planning, budget split and one-shot compression (SPEC §1 layout planning, §2 budget split)."""
import pytest
import timm
import torch

import cait


@pytest.fixture(scope="module")
def deit_s():
    return timm.create_model("deit_small_patch16_224").eval()


def test_planner_reproduces_the_paper_worked_example(deit_s):
    # Evenly spaced h4,v8 gives 41.1%; one shift (VTM to block 7) lands at 43.1% for a 43.3% target.
    assert cait.plan_atme(deit_s, 0.433, num_merges=2) == {4: "h", 7: "v"}
    assert cait.plan_atme(deit_s, 0.411, num_merges=2) == {4: "h", 8: "v"}
    assert cait.plan_atme(deit_s, 0.0) == {}


def test_planner_alternates_directions_and_gets_close(deit_s):
    for target in (0.2, 0.35, 0.5, 0.6):
        layout = cait.plan_atme(deit_s, target)
        assert list(layout.values()) == ["hv"[i % 2] for i in range(len(layout))]
        assert cait.atme_reduction(deit_s, layout) == pytest.approx(target, abs=0.03)


def test_planner_refuses_out_of_range_targets(deit_s):
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
            cait.plan_atme(deit_s, bad)


def test_budget_split_deit_s(deit_s):
    split = cait.split_budget(deit_s, 0.55)
    assert split.layout == {4: "h", 7: "v"}                               # ATME 43.1% + CDCP → 55%
    assert split.atme_reduction == pytest.approx(0.431, abs=0.002)
    assert split.cdcp_reduction == pytest.approx(0.55 - split.atme_reduction)
    assert split.target_flops == int(0.45 * split.base_flops)


def test_layout_that_alone_exceeds_the_budget_is_refused(deit_s):
    with pytest.raises(ValueError, match="alone removes 43.1% of FLOPs, more than the requested 30.0%"):
        cait.split_budget(deit_s, 0.30, layout="h4,v7")


def test_compress_reaches_the_target_without_touching_the_input(deit_s):
    before = {k: v.clone() for k, v in deit_s.state_dict().items()}
    small = cait.compress(deit_s, 0.55)
    flops = cait.count_flops(small)
    assert flops <= 0.45 * 4_598_882_304
    assert 1 - flops / 4_598_882_304 == pytest.approx(0.55, abs=0.002)
    assert small.cait_meta.merge == "h4,v7" and small.cait_meta.preview and small.cait_meta.kind == "preview"
    # The paper's CAIT DeiT-S: 2.1 G, 18.4 M (trained selection); the one-shot preview lands close.
    assert round(flops / 1e9, 1) == 2.1
    assert cait.count_params(small) == pytest.approx(18.4e6, rel=0.05)
    assert all(torch.equal(before[k], v) for k, v in deit_s.state_dict().items())
    assert small(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_compact_model_keeps_the_timm_contract(tiny):
    model = cait.compress(tiny(), 0.5)
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape[0] == 2 and feats.shape[-1] == 48
    assert torch.equal(model.forward_head(feats), model(x))
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)


def test_compress_refuses_impossible_and_already_compressed(tiny):
    with pytest.raises(ValueError, match="out of reach"):
        cait.compress(tiny(), 0.99, layout="")
    with pytest.raises(ValueError, match="uncompressed model"):
        cait.compress(cait.compress(tiny(), 0.5), 0.6)


def test_bad_arguments_are_refused_with_clear_errors(tiny):
    import timm
    model = tiny()
    for kwargs, match in (({"round_to": 0}, "round_to must be an integer >= 1"),
                          ({"atme_share": 1.5}, r"atme_share must be in \[0, 1\]"),
                          ({"layout": [4, 7]}, "a merge layout is a string such as 'h4,v7'")):
        with pytest.raises(ValueError, match=match):
            cait.compress(model, 0.5, **kwargs)
    with pytest.raises(ValueError, match="CAIT here compresses the DeiTs"):
        cait.compress(timm.create_model("vit_tiny_patch16_224"), 0.5)
    scores = cait.weight_scores(model)
    scores.ffn[1][3] = float("nan")
    with pytest.raises(ValueError, match="scores of ffn in block 1 contain NaN"):
        cait.select_channels(scores, cait.describe(model), cait.analytic_flops(model) // 2)
