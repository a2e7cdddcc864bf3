"""One contract for every kind of model this package makes, as timm's tests/test_models.py checks every variant.

Variants (tiny DeiT, perturbed weights): plain; ATME with one, two and three merges; an odd grid (7×7, padded
merges); with compactors; compact (CDCP only, CAIT, calibrated); saved and loaded. The paper's DeiT-Tiny and
DeiT-Small shapes (from :data:`cait.DEIT_MODELS`, random weights; DeiT-Base is too slow for a CPU suite) join as
plain, CAIT twin at the paper's reduction, and saved-and-loaded. Each must: run forward and
backward; agree between forward and forward_features + forward_head; take a new classifier; give intermediates on
each block's grid (or on the patch grid with ``dense=True``); match between the fused and the manual attention path;
trace (jit) and export (torch.export) to the same outputs; resize; count the same FLOPs with fvcore and the closed
form; run in bf16; round-trip through save/load exactly.
"""
import copy

import pytest
import torch

import cait
from cait.models.atme import model_token_grids
from conftest import randomize_

VARIANTS = ["plain", "atme_h", "atme_hv", "atme_3", "odd_grid", "compactors", "cdcp_only", "cait", "calibrated",
            "loaded"]
SHAPES = {"deit_tiny_patch16_224": 0.5, "deit_small_patch16_224": 0.55}
"""The paper's DeiTs the matrix also runs on, with the paper's FLOPs reduction (paper Tab. III)."""
assert set(SHAPES) < set(cait.DEIT_MODELS)
SHAPE_VARIANTS = [f"{arch}:{kind}" for arch in SHAPES for kind in ("plain", "cait", "loaded")]
_BUILT: dict[str, torch.nn.Module] = {}


def make_shape(arch: str, kind: str, tmp_path) -> torch.nn.Module:
    """A DeiT of the paper's shape (random, perturbed weights, 10 classes), its CAIT twin, or the twin saved and
    loaded."""
    import timm
    torch.manual_seed(0)
    base = randomize_(timm.create_model(arch, num_classes=10).eval(), std=0.02)
    if kind == "plain":
        return base
    twin = cait.compress(base, SHAPES[arch], round_to=8)
    return twin if kind == "cait" else cait.load_pretrained(cait.save_pretrained(twin, tmp_path / "ckpt"))


def make(kind: str, tmp_path) -> torch.nn.Module:
    torch.manual_seed(0)
    import timm
    if kind == "odd_grid":
        base = timm.create_model(cait.TEST_MODEL, img_size=28, num_classes=8)            # 7×7 patches
        return randomize_(cait.apply_atme(base, "h1,v3,h4").eval(), std=0.05)           # 7×7 → 7×4 → 4×4 → 4×2
    base = randomize_(timm.create_model(cait.TEST_MODEL, num_classes=8).eval(), std=0.05)
    if kind == "plain":
        return base
    if kind.startswith("atme"):
        return cait.apply_atme(base, {"atme_h": "h2", "atme_hv": "h2,v4", "atme_3": "h1,v2,h4"}[kind])
    if kind == "compactors":
        m = cait.add_compactors(cait.apply_atme(base, "h2,v4"))
        return randomize_(m, seed=1, std=0.01)                       # compactors off the identity
    if kind == "cdcp_only":
        return cait.compress(base, 0.4, layout="")
    if kind == "cait":
        return cait.compress(base, 0.5, round_to=4)
    if kind == "calibrated":
        return cait.compress(base, 0.5, calibration=torch.randn(16, 3, 32, 32), calibration_size=16)
    if kind == "loaded":
        return cait.load_pretrained(cait.save_pretrained(cait.compress(base, 0.5), tmp_path / "ckpt"))
    raise KeyError(kind)


@pytest.fixture(scope="module", params=VARIANTS + SHAPE_VARIANTS)
def model(request, tmp_path_factory):
    """Each variant, built once per module; tests that change a model change a copy."""
    if request.param not in _BUILT:
        where = tmp_path_factory.mktemp("variant")
        _BUILT[request.param] = (make_shape(*request.param.split(":"), where) if ":" in request.param
                                 else make(request.param, where)).eval()
    return _BUILT[request.param]


def x_for(model, batch=2, seed=0):
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(seed))


def test_forward_features_head_and_a_new_classifier(model):
    x = x_for(model)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
        assert torch.allclose(model.forward_head(model.forward_features(x)), out, atol=1e-6)
        m = copy.deepcopy(model)
        m.reset_classifier(5)
        assert m(x).shape == (2, 5)


def test_backward_reaches_every_parameter(model):
    model = copy.deepcopy(model).train()
    model(x_for(model)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or
                                                                              not torch.isfinite(p.grad).all())]
    assert missing == []


def test_intermediates_live_on_each_blocks_grid(model):
    x = x_for(model)
    grids, C = model_token_grids(model), model.embed_dim
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [tuple(t.shape) for t in inter] == [(2, C, h, w) for h, w in grids]
        assert torch.allclose(final, model.forward_features(x), atol=1e-6)
        nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
        assert [tuple(t.shape) for t in nlc] == [(2, h * w, C) for h, w in grids[-2:]]
        if cait.get_layout(model):
            H, W = model.patch_embed.grid_size
            dense = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True, dense=True)
            assert [tuple(t.shape) for t in dense] == [(2, C, H, W)] * 2


def test_fused_and_manual_attention_agree(model):
    x = x_for(model)
    with torch.no_grad():
        fused = model(x)
        manual = copy.deepcopy(model)
        for block in manual.blocks:
            block.attn.fused_attn = False
        assert torch.allclose(manual(x), fused, atol=1e-5)


def test_trace_and_export_give_the_same_outputs(model):
    x, other = x_for(model), x_for(model, batch=3, seed=1)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        assert torch.allclose(traced(other), model(other), atol=1e-5)
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        assert torch.allclose(program.module()(other), model(other), atol=1e-5)


def test_resize_and_count_flops(model):
    from cait.models.compactors import has_compactors
    size = model.patch_embed.img_size[0]
    if has_compactors(model):                                    # compactors are a training state: fvcore counts
        assert cait.count_flops(model) > cait.analytic_flops(model)   # their matmuls, the deployed model does not
    else:
        assert cait.count_flops(model) == cait.analytic_flops(model)
    bigger = size + 2 * model.patch_embed.patch_size[0]
    resized = copy.deepcopy(model)
    resized.set_input_size(img_size=bigger)
    with torch.no_grad():
        assert resized(torch.randn(1, 3, bigger, bigger)).shape == (1, model.num_classes)
    assert cait.count_flops(model, img_size=bigger) == cait.count_flops(resized)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        cait.count_flops(model, img_size=bigger + 1)


def test_bf16_forward(model):
    m = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        out = m(x_for(model).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_save_and_load_round_trip_exactly(model, tmp_path):
    from cait.models.compactors import has_compactors
    if has_compactors(model):
        with pytest.raises(ValueError, match="fold the compactors"):
            cait.save_pretrained(model, tmp_path / "m")
        return
    loaded = cait.load_pretrained(cait.save_pretrained(model, tmp_path / "m"))
    x = x_for(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_cfg["num_classes"] == model.num_classes and loaded.pretrained_cfg["hf_hub_id"] is None
    assert cait.get_layout(loaded) == cait.get_layout(model) and type(loaded) is type(model)
