"""Prefix tokens (issue "CAIT for the ViTs people compress today", item 1): ATME, its FLOPs and CDCP work on timm
ViTs with 0, 1, 2 and 1 + 4 prefix tokens, read from the model (``num_prefix_tokens``), never from its name.

Small configurations of the real timm classes: a ViT without a class token (average pooling, as SigLIP-style
models), a DeiT (CLS), a distilled DeiT (CLS + distillation token, ``VisionTransformerDistilled``), a ViT with four
registers, and DINOv2 with four registers (LayerScale, patch 14, a 5×5 grid), each with its embedding width and depth
overridden so every case runs in seconds.
"""
import copy

import pytest
import timm
import torch

import cait
from cait.layers.token_merge import TokenMerge, pool_pairs
from cait.models.atme import prefix_tokens
from cait.models.spec import describe
from conftest import randomize_
from test_prune import random_consistent_mask, zero_masked_rows_

SMALL = dict(embed_dim=48, num_heads=3, depth=4)
FAMILIES = {                                   # case → (timm name, overrides, prefix tokens P, patch grid)
    "no_class_token": ("vit_tiny_patch16_224", dict(SMALL, img_size=64, class_token=False, global_pool="avg"), 0,
                       (4, 4)),
    "deit": ("deit_tiny_patch16_224", dict(SMALL, img_size=64), 1, (4, 4)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(SMALL, img_size=64), 2, (4, 4)),
    "registers": ("vit_tiny_patch16_224", dict(SMALL, img_size=64, reg_tokens=4), 5, (4, 4)),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", dict(SMALL, img_size=70), 5, (5, 5)),
}


def build(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    name, kwargs, _, _ = FAMILIES[case]
    return randomize_(timm.create_model(name, num_classes=10, **kwargs).eval(), std=0.05)


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("direction", ["h", "v"])
def test_a_merge_at_initialisation_averages_each_pair_and_passes_every_prefix_token(prefix, direction):
    B, (H, W), C = 2, (4, 5), 6                          # an odd width: the last column is repeated
    x = torch.randn(B, prefix + H * W, C)
    out = TokenMerge(C, direction, (H, W), prefix=prefix)(x)
    expected = pool_pairs(x[:, prefix:].reshape(B, H, W, C), direction).reshape(B, -1, C)
    torch.testing.assert_close(out[:, :prefix], x[:, :prefix])
    torch.testing.assert_close(out[:, prefix:], expected)
    with pytest.raises(ValueError, match=f"expects {prefix} \\+ 4×5 tokens"):
        TokenMerge(C, direction, (H, W), prefix=prefix)(x[:, 1:])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_atme_and_its_flops_read_the_prefix_tokens_from_the_model(name):
    model = build(name)
    _, _, P, grid = FAMILIES[name]
    assert prefix_tokens(model) == P and tuple(model.patch_embed.grid_size) == grid
    merged = cait.apply_atme(copy.deepcopy(model), "h1,v2")
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    assert merged(x).shape == (2, 10)
    (H, W), w, h = grid, (grid[1] + 1) // 2, (grid[0] + 1) // 2
    assert [b.tokens for b in describe(merged).blocks] == [P + H * W, P + H * w, P + h * w, P + h * w]   # 4×4 → 4×2 → 2×2
    assert cait.analytic_flops(merged) == cait.count_flops(merged)          # the closed form is fvcore's count
    assert cait.analytic_flops(model) == cait.count_flops(model)
    # Every prefix token leaves the merged block where it entered: the block's input after the merge keeps them.
    seen = {}
    merged.blocks[1].merge.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    merged(x)
    torch.testing.assert_close(seen["y"][:, :P], seen["x"][:, :P])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_compact_model_equals_its_masked_compactor_model_whatever_the_prefix(name):
    model = cait.add_compactors(cait.apply_atme(build(name), "h1"))
    randomize_(model, seed=7, std=0.05)                                  # compactors off the identity
    mask = random_consistent_mask(describe(model), seed=3)
    zero_masked_rows_(model, mask)
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    masked = model(x)
    compact = cait.prune(copy.deepcopy(model), mask)
    torch.testing.assert_close(compact(x), masked, rtol=1e-4, atol=1e-5)
    assert cait.analytic_flops(compact) == cait.count_flops(compact)


@pytest.mark.parametrize("name", ["deit_distilled", "registers"])
def test_the_calibration_refit_matches_the_original_with_prefix_tokens_untouched(name):
    """The least-squares refit pools only the patch tokens of the original onto the twin's grid; every prefix token
    is a target as it is. With every channel kept, the refit merge block lowers its output error. (DINOv2's layer
    scale starts at 1e-5, so its merged blocks already match to ~1e-6 and are not a fair case for this check.)"""
    from cait.compress.refit import refit_
    original = build(name)
    twin = cait.apply_atme(copy.deepcopy(original), "h1")
    images = torch.randn(24, 3, *original.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    report = refit_(twin, original, images, batch_size=8)
    merge = report["blocks"][1]
    assert "fuse" in merge["refit"] and merge["mse_after"] < merge["mse_before"]


@pytest.mark.parametrize("name", ["deit_distilled", "registers", "dinov2_registers", "no_class_token"])
def test_compress_takes_any_plain_vit_and_its_twin_saves_and_loads(name, tmp_path):
    """cait.compress judges the model by its modules (cait.models.family): every case above compresses to the
    target, and its twin round-trips through a checkpoint (the config records the architecture)."""
    model = build(name)
    twin = cait.compress(model, 0.5, round_to=4)
    assert 1 - cait.count_flops(twin) / cait.count_flops(model) == pytest.approx(0.5, abs=0.02)
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    loaded = cait.load_pretrained(cait.save_pretrained(twin, tmp_path / "twin"))
    torch.testing.assert_close(loaded(x), twin(x))


# ToMe, token pruning (EViT) and CLS attention over P prefix tokens (issue item 1: "every prefix token passes").
def _tokens_seen(model, x):
    """Tokens each block's attention and MLP see in one forward pass."""
    seen = []
    for b in model.blocks:
        b.attn.register_forward_hook(lambda m, a, o: seen.append(("attn", a[0].shape[1])))
        b.mlp.register_forward_hook(lambda m, a, o: seen.append(("mlp", a[0].shape[1])))
    model(x)
    return [(seen[2 * i][1], seen[2 * i + 1][1]) for i in range(len(model.blocks))]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tome_merges_patches_only_and_its_flops_are_fvcore_s_whatever_the_prefix(name):
    from cait.baselines.tome import apply_tome, tome_dense_intermediates, tome_flops, tome_token_counts
    model, (_, _, P, (H, W)) = build(name), FAMILIES[name]
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    tome = apply_tome(copy.deepcopy(model), [3, 2, 2, 1])
    assert tome.tome.prefix == P
    assert tome(x).shape == (2, 10)
    assert tome_flops(tome) == cait.count_flops(tome)                           # the closed form is fvcore's count
    expected = tome_token_counts(H * W, [3, 2, 2, 1], prefix=P)
    assert _tokens_seen(copy.deepcopy(tome), x) == expected
    tome(x)
    sizes = tome.tome.size                                                      # (B, P + L − Σr, 1) after the pass
    assert sizes.shape[1] == expected[-1][1] and torch.equal(sizes[:, :P], torch.ones(2, P, 1))
    assert torch.allclose(sizes[:, P:].sum(1), torch.full((2, 1), float(H * W)))   # every patch in one token
    dense = tome_dense_intermediates(tome, x, [1, 3])
    assert [tuple(d.shape) for d in dense] == [(2, 48, H, W)] * 2


@pytest.mark.parametrize("name", [n for n in FAMILIES if FAMILIES[n][2] > 0 and n != "no_class_token"])
def test_token_pruning_keeps_every_prefix_token_and_its_flops_are_fvcore_s(name):
    from cait.baselines.token_pruning import (apply_token_pruning, token_counts, token_pruning_dense_intermediates,
                                              token_pruning_flops)
    model, (_, _, P, (H, W)) = build(name), FAMILIES[name]
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    evit = apply_token_pruning(copy.deepcopy(model), 0.5, [1, 2])
    assert evit(x).shape == (2, 10) and evit.pruning.prefix == P
    assert token_pruning_flops(evit) == cait.count_flops(evit)
    assert _tokens_seen(copy.deepcopy(evit), x) == [c[:2] for c in token_counts(H * W, 4, 0.5, [1, 2], prefix=P)]
    assert [tuple(d.shape) for d in token_pruning_dense_intermediates(evit, x, [3])] == [(2, 48, H, W)]


def test_token_pruning_without_a_class_token_is_refused_by_what_it_needs():
    from cait.baselines.token_pruning import apply_token_pruning
    with pytest.raises(ValueError, match="ranks patches by the CLS token's attention; this model has no class token"):
        apply_token_pruning(build("no_class_token"), 0.5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cls_attention_maps_cover_the_patches_and_say_what_they_show(name):
    model, (_, _, P, (H, W)) = build(name), FAMILIES[name]
    merged = cait.apply_atme(copy.deepcopy(model), "h1")
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    att = cait.cls_attention(merged, x, block=2)
    assert att.maps.shape == (2, 3, H, (W + 1) // 2) and att.patch_maps.shape == (2, 3, H, W)
    total = att.maps.sum(dim=(-2, -1))                                           # (B, heads)
    if name == "no_class_token":                  # the mean over queries of rows that sum to 1: sums to 1
        assert att.query == "mean" and torch.allclose(total, torch.ones_like(total))
    else:                                         # the CLS row minus what the prefix tokens take
        assert att.query == "cls" and bool((total < 1).all())
