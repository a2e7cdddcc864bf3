"""One contract for every kind of model this package makes, as timm's tests/test_models.py checks every variant.

Variants (tiny DeiT, perturbed weights): plain; ATME with one, two and three merges; an odd grid (7×7, padded
merges); with compactors; compact (CDCP only, CAIT, calibrated); saved and loaded. The paper's DeiT-Tiny and
DeiT-Small shapes (from :data:`cait.DEIT_MODELS`, random weights; DeiT-Base is too slow for a CPU suite) join as
plain, CAIT twin at the paper's reduction, and saved-and-loaded. Each must: run forward and
backward; agree between forward and forward_features + forward_head; take a new classifier; give intermediates on
each block's grid (or on the patch grid with ``dense=True``); match between the fused and the manual attention path;
trace (jit) and export (torch.export) to the same outputs; resize; count the same FLOPs with fvcore and the closed
form; run in bf16; round-trip through save/load exactly.

The family matrix (end of the file) runs the registry :data:`cait.models.family.TESTED`: 22 timm names in eight
families (ViT, DeiT, distilled DeiT, DeiT III, DINOv2 with and without registers, CLIP, SigLIP), each a small
configuration of its real class, and checks what differs between families: FLOPs against fvcore, ATME at
initialisation against pair averages with the prefix tokens passed, compact against masked, dense features on the
patch grid, checkpoint, trace and export.
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


# ----------------------------------------------------------------------------------------------------------------
# The family matrix (issue "CAIT for the ViTs people compress today", item 6): every name of the registry
# (cait.models.family.TESTED), a small configuration of its real timm class (3 blocks, C = 48, 3 heads, a 4×4 grid,
# or 5×5 for DINOv2 as at its 518 px default), its CAIT twin without half of its blocks' FLOPs (at C = 48 the patch
# embedding is a large share, so half of the whole model is out of reach for patch 32).
# ----------------------------------------------------------------------------------------------------------------
from cait.models.family import NOT_YET, TESTED  # noqa: E402

FAMILY_NAMES = [(family, name) for family, names in TESTED.items() for name in names]
_FAMILY_BUILT: dict[str, tuple] = {}


def family_pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """``(original, twin, reduction)``: the small configuration (perturbed weights, 10 classes), ``cait.compress`` of
    it, and the FLOPs reduction asked for (half of the blocks' share)."""
    if name not in _FAMILY_BUILT:
        import timm
        from cait.models.deit import fixed_grid_kwargs
        from cait.models.spec import describe
        torch.manual_seed(0)
        meta = timm.create_model(name, pretrained=False, depth=1, device="meta")
        patch, side = meta.patch_embed.patch_size[0], 5 if "dinov2" in name else 4
        fixed = fixed_grid_kwargs(meta)                                          # DINOv3
        original = randomize_(timm.create_model(name, pretrained=False, depth=3, embed_dim=48, num_heads=3,
                                                img_size=side * patch, num_classes=10, **fixed).eval(), std=0.05)
        spec = describe(original)
        target = 0.5 * sum(b.flops() for b in spec.blocks) / spec.flops()
        _FAMILY_BUILT[name] = (original, cait.compress(original, target, round_to=4).eval(), target)
    return _FAMILY_BUILT[name]


def test_the_registry_spans_the_families_the_issue_names():
    assert len(FAMILY_NAMES) >= 24 and set(TESTED) >= {"vit", "deit", "deit_distilled", "deit3", "dinov2",
                                                       "dinov2_registers", "clip", "siglip", "eva02", "dinov3"}


@pytest.mark.parametrize("family,name", FAMILY_NAMES)
def test_every_family_compresses_to_half_its_blocks_flops_with_timm_s_contract(family, name):
    original, twin, target = family_pair(name)
    x = x_for(original)
    assert cait.analytic_flops(original) == cait.count_flops(original)          # closed form = fvcore, both
    assert cait.analytic_flops(twin) == cait.count_flops(twin)
    assert 1 - cait.count_flops(twin) / cait.count_flops(original) == pytest.approx(target, abs=0.01)
    with torch.no_grad():
        out = twin(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        assert torch.allclose(twin.forward_head(twin.forward_features(x)), out, atol=1e-6)
        H, W = original.patch_embed.grid_size
        dense = twin.forward_intermediates(x, indices=[0, -1], intermediates_only=True, dense=True)
        assert [tuple(t.shape) for t in dense] == [(2, 48, H, W)] * 2           # dense features: the patch grid


@pytest.mark.parametrize("family,name", FAMILY_NAMES)
def test_every_family_merges_by_pair_average_at_initialisation(family, name):
    from cait.layers.token_merge import pool_pairs
    from cait.models.atme import prefix_tokens
    original, _, _ = family_pair(name)
    merged = cait.apply_atme(copy.deepcopy(original), "h1")
    seen = {}
    merged.blocks[1].merge.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    with torch.no_grad():
        merged(x_for(original))
    P, (H, W), (B, _, C) = prefix_tokens(original), original.patch_embed.grid_size, seen["x"].shape
    torch.testing.assert_close(seen["y"][:, :P], seen["x"][:, :P])
    torch.testing.assert_close(seen["y"][:, P:], pool_pairs(seen["x"][:, P:].reshape(B, H, W, C), "h").reshape(B, -1, C))


@pytest.mark.parametrize("family,name", FAMILY_NAMES)
def test_every_family_compact_model_equals_its_masked_compactor_model(family, name):
    from cait.models.spec import describe
    from test_prune import random_consistent_mask, zero_masked_rows_
    original, _, _ = family_pair(name)
    model = randomize_(cait.add_compactors(cait.apply_atme(copy.deepcopy(original), "h1")), seed=7, std=0.05)
    mask = random_consistent_mask(describe(model), seed=3)
    zero_masked_rows_(model, mask)
    x = x_for(original)
    with torch.no_grad():
        torch.testing.assert_close(cait.prune(copy.deepcopy(model), mask)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,name", FAMILY_NAMES)
def test_every_family_twin_saves_loads_and_exports_to_the_same_function(family, name, tmp_path):
    _, twin, _ = family_pair(name)
    x, other = x_for(twin), x_for(twin, batch=3, seed=1)
    loaded = cait.load_pretrained(cait.save_pretrained(twin, tmp_path / "twin"))
    with torch.no_grad():
        assert torch.equal(loaded(x), twin(x)) and type(loaded) is type(twin)
        traced = torch.jit.trace(loaded, x, check_trace=False)
        assert torch.allclose(traced(other), twin(other), atol=1e-5)
        program = torch.export.export(loaded, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
        assert torch.allclose(program.module()(other), twin(other), atol=1e-5)


@pytest.mark.parametrize("family,name", [(f, n) for f, names in NOT_YET.items() for n in names])
def test_families_not_supported_yet_are_refused_naming_what_they_lack(family, name):
    import timm
    model = timm.create_model(name, pretrained=False, depth=1, device="meta")
    with pytest.raises(ValueError, match={"eva02_scale_norm": "normalises its hidden layer",
                                          "beit3_qk_norm": "normalises q/k"}[family]):
        cait.compress(model, 0.5)
