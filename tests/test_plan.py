"""Layout planning and the ATME/CDCP budget split (docs/method.md: layout planning, budget split)."""
import pytest

import cait


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
