"""One-shot compression (docs/method.md: CDCP): the FLOPs target, the input untouched, the timm contract, clear
refusals."""
import pytest
import torch

import cait


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
    # Refused by what the model lacks, not by its name.
    eva = timm.create_model("eva02_base_patch14_224", depth=2, img_size=56)          # scale_mlp: a norm in the FFN
    with pytest.raises(ValueError, match="MLP normalises its hidden layer"):
        cait.compress(eva, 0.5)
    with pytest.raises(ValueError, match="dynamic image size"):
        cait.compress(timm.create_model("vit_tiny_patch16_224", depth=2, dynamic_img_size=True), 0.5)
    with pytest.raises(ValueError, match="normalises q/k"):
        cait.compress(timm.create_model("beit3_base_patch16_224", depth=2, embed_dim=48, num_heads=3), 0.5)
    scores = cait.weight_scores(model)
    scores.ffn[1][3] = float("nan")
    with pytest.raises(ValueError, match="scores of ffn in block 1 contain NaN"):
        cait.select_channels(scores, cait.describe(model), cait.analytic_flops(model) // 2)


def test_compress_reads_the_model_structure_twice_not_per_planning_step(tiny, monkeypatch):
    """Planning works on one ModelSpec (issue: a DeiT-S compress walked the model 102 times; now 2)."""
    import importlib
    compress_mod = importlib.import_module("cait.compress.oneshot")
    flops_mod, plan_mod = importlib.import_module("cait.models.spec"), importlib.import_module("cait.compress.plan")
    calls = []
    real = flops_mod.describe

    def counting(model):
        calls.append(1)
        return real(model)
    monkeypatch.setattr(plan_mod, "describe", counting)
    monkeypatch.setattr(compress_mod, "describe", counting)
    cait.compress(tiny(), 0.5)                                              # planned layout + CDCP
    assert len(calls) == 2                        # the plan's spec, the merged model's (the pruned one's: its widths)
