"""ATME: HTM/VTM, layouts, grids (docs/method.md: ATME)."""
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import randomize_
from timm.models.vision_transformer import Block

from cait.layers.token_merge import TokenMerge, pair_tokens
from cait.models.atme import MergeBlock, apply_atme, get_layout, upsample_to_patch_grid
from cait.models.layout import format_layout, parse_layout, token_grids


def test_htm_pairs_columns_and_vtm_pairs_rows():
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float).reshape(2, 4, 6, 3)          # (B, H, W, C)
    h = pair_tokens(x, "h")
    assert h.shape == (2, 4, 3, 6)
    assert torch.equal(h[:, :, 1, :3], x[:, :, 2]) and torch.equal(h[:, :, 1, 3:], x[:, :, 3])
    v = pair_tokens(x, "v")
    assert v.shape == (2, 2, 6, 6)
    assert torch.equal(v[:, 1, :, :3], x[:, 2]) and torch.equal(v[:, 1, :, 3:], x[:, 3])


def test_odd_side_repeats_last_column_and_row():
    x = torch.randn(1, 5, 7, 4)
    h = pair_tokens(x, "h")
    assert h.shape == (1, 5, 4, 8)
    assert torch.equal(h[:, :, -1, :4], x[:, :, -1]) and torch.equal(h[:, :, -1, 4:], x[:, :, -1])
    v = pair_tokens(x, "v")
    assert v.shape == (1, 3, 7, 8)
    assert torch.equal(v[:, -1, :, :4], x[:, -1]) and torch.equal(v[:, -1, :, 4:], x[:, -1])


@pytest.mark.parametrize("direction,grid", [("h", (4, 6)), ("v", (4, 6)), ("h", (5, 7)), ("v", (5, 7))])
def test_merge_starts_as_average_pooling_and_keeps_cls(direction, grid):
    H, W = grid
    C = 8
    x = torch.randn(2, 1 + H * W, C)
    m = TokenMerge(C, direction, grid)
    y = m(x)
    assert torch.equal(y[:, :1], x[:, :1])                                           # CLS untouched
    g = x[:, 1:].reshape(2, H, W, C).permute(0, 3, 1, 2)                           # (B, C, H, W)
    # Pad odd sides by repeating the edge, then 2×1 / 1×2 average pooling.
    g = F.pad(g, (0, W % 2 if direction == "h" else 0, 0, H % 2 if direction == "v" else 0), mode="replicate")
    pooled = F.avg_pool2d(g, (1, 2) if direction == "h" else (2, 1))
    assert m.out_grid == pooled.shape[-2:]
    torch.testing.assert_close(y[:, 1:], pooled.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_merge_rejects_wrong_token_count():
    with pytest.raises(ValueError, match="expects 1 \\+ 4×4 tokens"):
        TokenMerge(8, "h", (4, 4))(torch.randn(1, 10, 8))


def test_layout_parsing_and_formatting():
    assert parse_layout("h4,v8") == {4: "h", 8: "v"}
    assert parse_layout(" V8 , h4 ") == {4: "h", 8: "v"}
    assert parse_layout({8: "v", 4: "H"}) == {4: "h", 8: "v"}
    assert parse_layout("") == parse_layout(None) == {}
    assert format_layout({8: "v", 4: "h"}) == "h4,v8"
    for bad in ("x4", "h", "h-1", "4h", "h4;v8"):
        with pytest.raises(ValueError, match=r"bad merge layout .*is not hN or vN"):
            parse_layout(bad)
    with pytest.raises(ValueError, match="twice"):
        parse_layout("h4,v4")
    # Every problem at once, and no angle brackets (an HTML toast swallowed "h<block>" as a tag).
    with pytest.raises(ValueError) as e:
        parse_layout("x4,h2,v2,q")
    assert "'x4' is not hN or vN; block 2 is named twice; 'q' is not hN or vN" in str(e.value)
    assert "<" not in str(e.value)
    with pytest.raises(ValueError, match="'h' or 'v'"):
        parse_layout({3: "x"})


def test_deit_tiny_three_merges_grids():
    # The paper's 3-merge DeiT-Tiny layout needs odd padding: 14×14 → 14×7 → 7×7 → 7×4.
    grids = token_grids((14, 14), 12, "h3,v6,h9")
    assert grids[2] == (14, 14) and grids[3] == (14, 7) and grids[6] == (7, 7) and grids[9] == (7, 4)
    assert grids[11] == (7, 4)


def test_layout_must_fit_the_model():
    with pytest.raises(ValueError, match="has 12 blocks"):
        token_grids((14, 14), 12, "h12")
    with pytest.raises(ValueError, match=r"names blocks 12, 20, but the model has 12 blocks \(0..11\)"):
        token_grids((14, 14), 12, "h12,v20")
    with pytest.raises(ValueError, match="already 1"):
        token_grids((2, 2), 4, "h0,h1")
    # Two problems, both named at once (not the first alone).
    with pytest.raises(ValueError, match=r"names block 9, .*; cannot merge at block 1: the width of the 2×1 grid"):
        token_grids((2, 2), 4, "h0,h1,v9")


def test_apply_atme_token_counts_and_layout(tiny):
    model = apply_atme(tiny(), "h1,v3")
    assert get_layout(model) == {1: "h", 3: "v"}
    assert isinstance(model.blocks[1], MergeBlock) and type(model.blocks[0]) is Block
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1])) for b in model.blocks]
    model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == [65, 33, 33, 17, 17, 17]
    with pytest.raises(ValueError, match="already has an ATME layout"):
        apply_atme(model, "h4")


def test_merge_block_keeps_timm_block_forward_with_layer_scale(tiny):
    # Layer scale on: a forward copied from timm that drops ls1/ls2 would fail this.
    model = randomize_(tiny(init_values=0.3))
    ref = timm.create_model("deit_test_patch4_32", init_values=0.3).eval()
    ref.load_state_dict(model.state_dict())
    apply_atme(model, "h2")
    x = torch.randn(2, 65, 48)
    merged = model.blocks[2].merge(x)
    torch.testing.assert_close(model.blocks[2](x), Block.forward(ref.blocks[2], merged))


def test_atme_at_identity_fusion_matches_average_pooled_tokens(tiny):
    """A merge before block 5 leaves blocks 0-4 as they were, passes CLS through, and (at its mean-of-pair start)
    averages each horizontal pair of the tokens block 4 produced."""
    import copy
    model = randomize_(tiny())
    x = torch.randn(1, 3, 32, 32)
    ref, before, captured = copy.deepcopy(model), {}, {}
    ref.blocks[4].register_forward_hook(lambda m, a, o: before.update(out=o))
    ref(x)
    apply_atme(model, "h5")
    model.blocks[5].merge.register_forward_hook(lambda m, a, o: captured.update(inp=a[0], out=o))
    model(x)
    torch.testing.assert_close(captured["inp"], before["out"])                      # earlier blocks unchanged
    assert torch.equal(captured["out"][:, 0], captured["inp"][:, 0])               # CLS untouched
    g = captured["inp"][:, 1:].reshape(1, 8, 8, 48)                                 # (B, H, W, C)
    pooled = ((g[:, :, 0::2] + g[:, :, 1::2]) / 2).reshape(1, 32, 48)               # columns 2j, 2j+1
    torch.testing.assert_close(captured["out"][:, 1:], pooled)


def test_upsample_to_patch_grid_is_exact_with_padding():
    maps = torch.arange(7 * 4, dtype=torch.float).reshape(1, 7, 4)        # grid after h3,v6,h9 on 14×14
    up = upsample_to_patch_grid(maps, "h3,v6,h9", grid=(14, 14), block=11)
    assert up.shape == (1, 14, 14)
    # Token (i, j) covers rows 2i..2i+1 and columns 4j..4j+3 (cropped at 14).
    assert up[0, 5, 13] == maps[0, 2, 3] and up[0, 0, 0] == maps[0, 0, 0] and up[0, 13, 8] == maps[0, 6, 2]
