"""The ToMe baseline (cait.baselines): bipartite soft matching, proportional attention, FLOPs, schedules."""
import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import Block

import cait
from cait.baselines.tome import (ToMeBlock, ToMeState, keep_output, apply_tome, merge_tokens, tome_flops,
                                 tome_schedule, tome_token_counts)
from conftest import randomize_


def test_merge_tokens_is_a_size_weighted_mean_that_keeps_the_total_size():
    # Tokens 0 and 1 are parallel (cosine 1), token 2 and 3 orthogonal to them: r=1 merges A-token 0 into B-token 1.
    x = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])
    size = torch.tensor([[[1.0], [3.0], [1.0], [1.0]]])
    out, s = merge_tokens(x, size, x, r=1)
    assert out.shape == (1, 3, 2) and s.sum() == size.sum()
    # Kept A token (index 2) first, then the B tokens (1 absorbed 0 with weights 1 and 3; 3 untouched).
    assert torch.allclose(out[0], torch.tensor([[0.0, 1.0], [(1 * 1 + 3 * 3) / 4, 0.0], [0.0, -1.0]]))
    assert s[0, :, 0].tolist() == [1.0, 4.0, 1.0]
    same, s0 = merge_tokens(x, size, x, r=0)
    assert same is x and s0 is size
    assert merge_tokens(x, size, x, r=10)[0].shape == (1, 2, 2)            # at most every A token merges


def test_tome_block_merging_identical_tokens_changes_nothing():
    """Proportional attention + weighted merging are exact: a block whose merged tokens are identical twins gives
    the plain block's outputs for every token it keeps."""
    torch.manual_seed(0)
    block = randomize_(Block(dim=16, num_heads=2, qkv_bias=True), std=0.1).eval()
    twins = torch.randn(1, 5, 16)
    x = torch.cat([torch.randn(1, 1, 16), twins.repeat_interleave(2, dim=1)], dim=1)   # CLS + 5 identical pairs
    with torch.no_grad():
        plain = block(x)                                                                  # (1, 11, 16)
        tome = copy.deepcopy(block)
        tome.__class__ = ToMeBlock
        tome.tome, tome.tome_index = ToMeState([3]), 0
        tome.attn.qkv.register_forward_hook(keep_output)
        merged = tome(x)                                                                  # (1, 8, 16)
    assert merged.shape == (1, 8, 16) and tome.tome.size[0, :, 0].sum() == 11
    assert torch.allclose(merged[:, 0], plain[:, 0], atol=1e-5)                          # the CLS token
    for row in merged[0, 1:]:                                                             # every kept token
        assert (plain[0, 1:] - row).abs().amax(-1).min() < 1e-5


@pytest.mark.parametrize("name", [cait.TEST_MODEL, "deit_tiny_patch16_224"])
def test_tome_flops_closed_form_equals_fvcore_and_r0_is_the_original(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    zero = apply_tome(copy.deepcopy(model), 0)
    assert torch.allclose(zero(x), model(x), atol=1e-5)
    assert tome_flops(zero) == cait.count_flops(model)
    for r in (1, 4, [3, 0, 5, 2, 7, 1] + [2] * (len(model.blocks) - 6)):
        tome = apply_tome(copy.deepcopy(model), r)
        assert tome(x).shape == (2, model.num_classes)
        assert tome_flops(tome) == cait.count_flops(tome)
        if r == 4:                                                   # part by part too (the Cost tab's chart)
            from cait.baselines.tome import tome_flops_by_block
            from cait.measure.flops import flops_by_block
            assert tome_flops_by_block(tome) == flops_by_block(tome)


def test_schedule_matches_a_flops_target():
    model = timm.create_model("deit_tiny_patch16_224")
    base = cait.count_flops(model)
    s = tome_schedule(model, 0.5)
    assert tome_token_counts(196, s)[0] == (197, 197 - s[0])
    red = 1 - tome_flops(model, s) / base
    assert 0.5 <= red < 0.5 + 0.003                                        # one token in one block past the target
    assert max(s) - min(s) <= 1 and s == sorted(s, reverse=True)
    assert tome_schedule(model, 0.0) == [0] * 12
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        tome_schedule(model, 1.2)
    with pytest.raises(ValueError, match="cannot remove"):
        tome_schedule(model, 0.97)


def test_apply_tome_refuses_what_it_cannot_patch(tiny):
    with pytest.raises(ValueError, match="r >= 0 for each of the 6 blocks"):
        apply_tome(tiny(), [1, 2])
    with pytest.raises(ValueError, match="r >= 0"):
        apply_tome(tiny(), -1)
    with pytest.raises(ValueError, match="ATME layout"):
        apply_tome(cait.apply_atme(tiny(), "h2"), 2)
    once = apply_tome(tiny(), 2)
    with pytest.raises(ValueError, match="already has ToMe"):
        apply_tome(once, 2)
    with pytest.raises(TypeError, match="ToMe patches timm's Block with timm's Attention, or EvaBlock"):
        apply_tome(cait.compress(tiny(), 0.3, layout=""), 2)
