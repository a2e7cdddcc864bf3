"""The measured planner (cait.measure.frontier) and calibration that never makes a twin worse (cait.compress.refit)."""
import copy
import json

import pytest
import torch

import cait
from cait.cli.compress import main as compress_main
from cait.compress.oneshot import held_out_kl, split_held_out
from cait.compress.refit import refit_
from cait.data.synthetic import SyntheticShapes
from cait.io.bundled import bundled_pair
from cait.measure.frontier import candidate_layouts, search_layouts
from conftest import randomize_


@pytest.fixture
def model(tiny):
    return randomize_(tiny(num_classes=8), std=0.05)


def test_a_refit_that_does_not_lower_the_held_out_kl_is_put_back_exactly(model):
    """A twin identical to its original has held-out KL 0, which no refit can lower: with held-out images every
    block's Linears are put back bit for bit; without them a strong ridge changes the model (the old behaviour)."""
    x, held = torch.randn(32, 3, 32, 32), torch.randn(16, 3, 32, 32)
    twin = copy.deepcopy(model)
    report = refit_(twin, model, x, ridge=10.0, held_out=held)
    assert not any(b["kept"] for b in report["blocks"]) and report["kl_end"] == report["kl_start"] == 0
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    changed = copy.deepcopy(model)
    kept_all = refit_(changed, model, x, ridge=10.0)
    assert all(b["kept"] for b in kept_all["blocks"]) and kept_all["kl_end"] is None
    assert not torch.equal(changed.blocks[0].mlp.fc2.weight, model.blocks[0].mlp.fc2.weight)


def test_judged_refit_lowers_the_held_out_kl_step_by_step(model):
    twin = cait.compress(model, 0.5, layout="h2,v4")
    report = refit_(twin, model, torch.randn(48, 3, 32, 32), held_out=torch.randn(16, 3, 32, 32))
    kls = [report["kl_start"]] + [b["kl"] for b in report["blocks"]]
    assert all(b <= a for a, b in zip(kls, kls[1:]))                   # a kept refit lowers it; a refused one keeps it
    assert any(b["kept"] for b in report["blocks"]) and report["kl_end"] < report["kl_start"]


def test_calibrated_twin_records_its_choices_and_split(model):
    fit, held = split_held_out(torch.zeros(40, 3, 32, 32))
    assert (len(fit), len(held)) == (30, 10)
    twin = cait.compress(model, 0.5, layout="h3", calibration=torch.randn(40, 3, 32, 32), calibration_size=40)
    c = twin.cait_meta.calibration
    assert c.channels in ("fisher", "weight") and c.held_out_kl[1] <= c.held_out_kl[0]
    assert set(c.refit_blocks) <= set(range(6))
    assert twin.cait_meta.planner == {"planner": "explicit"}
    assert cait.compress(model, 0.5).cait_meta.planner == {"planner": "paper", "atme_share": 0.8}
    assert cait.Layout.parse("none") == cait.Layout() and cait.Layout.parse(" None ") == {}


@pytest.mark.parametrize("layout", ["h4,v9", "none"])      # one case each, so two test processes share them
def test_calibrated_is_no_worse_than_the_preview_on_the_bundled_deit(layout):
    """The regression the planner issue found: calibrating the planned layout h4,v9 of the bundled DeiT-Tiny used to
    end below its weight-norm preview (48.7% against 51.0% top-1; KL 1.08 against 0.90 nats). Scored by the KL to the
    original on 256 held-out images neither step saw (128 calibration images: 96 fit, 32 judge)."""
    pair = bundled_pair()
    if pair is None:
        pytest.skip("no bundled pair in assets/")
    original, _ = pair.load()
    val = SyntheticShapes(256, 224, 0, "val")
    x = torch.stack([val[i][0] for i in range(len(val))])
    preview = cait.compress(original, 0.5, layout=layout)
    calibrated = cait.compress(original, 0.5, layout=layout, calibration="synthetic", calibration_size=128)
    kl_p, kl_c = held_out_kl(preview, original, x), held_out_kl(calibrated, original, x)
    assert kl_c <= kl_p, (layout, kl_c, kl_p)


def test_candidates_stay_within_the_budget(tiny):
    m = tiny()
    one = candidate_layouts(m, 0.3)
    assert one and all(cait.atme_reduction(m, l) <= 0.3 for l in one)
    assert {str(l) for l in one} >= {"h5", "v5"} and "h0" not in {str(l) for l in one}
    two = candidate_layouts(m, 0.5, cait.Layout.parse("h4"))
    assert all(4 in l and len(l) == 2 and cait.atme_reduction(m, l) <= 0.5 for l in two)


def test_search_measures_candidates_and_chooses_by_agreement_above_the_speed_floor(model):
    x = torch.randn(80, 3, 32, 32)
    found = search_layouts(model, 0.5, calibration=x, calibration_size=40, proxy_images=16, score_images=24,
                           max_merges=1, rounds=1, batch_size=8, finalists=2)
    assert all(c.atme_reduction <= 0.5 for c in found.candidates)
    assert {c.layout for c in found.candidates} >= {"", "h5", "v5"}
    finalists = [c for c in found.candidates if c.agreement is not None]
    assert 1 <= len(finalists) <= 2 and found.choice in finalists
    assert all(c.speedup >= found.min_speedup for c in finalists)
    assert found.choice.agreement == max(c.agreement for c in finalists)
    assert found.min_speedup == pytest.approx(0.9 * found.tome_speedup, abs=1e-3)
    meta = found.twin.cait_meta
    assert meta.planner["planner"] == "measured" and meta.planner["layout"] == found.choice.layout
    assert meta.merge == found.choice.layout and meta.kind == "calibrated"
    assert found.frontier() and json.dumps(found.to_dict())
    # A speed floor nothing reaches: the fastest timed candidate is taken, and the rule says so.
    slow = search_layouts(model, 0.5, calibration=x, calibration_size=40, proxy_images=16, score_images=24,
                          max_merges=1, rounds=1, batch_size=8, min_speedup=1e9)
    timed = [c for c in slow.candidates if c.speedup is not None]
    assert slow.choice.speedup == max(c.speedup for c in timed) and "no candidate reached" in slow.rule
    with pytest.raises(ValueError, match="max_merges"):
        search_layouts(model, 0.5, calibration=x, max_merges=5)


def test_compress_command_line_with_the_measured_planner(tmp_path, capsys, model):
    src = cait.save_pretrained(model, tmp_path / "original")
    out = tmp_path / "twin"
    assert compress_main(["--model", str(src), "--flops-reduction", "0.5", "--plan", "measured", "--max-merges", "1",
                          "--calibration", "synthetic", "--calibration-size", "16", "--batch-size", "8",
                          "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["planner"]["planner"] == "measured" and summary["merge"] == summary["planner"]["choice"]["layout"]
    assert cait.load_pretrained(out).cait_meta.planner["planner"] == "measured"
    assert compress_main(["--model", str(src), "--flops-reduction", "0.5", "--plan", "measured", "--calibration",
                          "none", "--output", str(out)]) == 2
    assert "--plan measured scores calibrated twins" in capsys.readouterr().err
