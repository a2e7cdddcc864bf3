"""CLS attention maps through the merged grid."""
import pytest
import torch

import cait
from cait.measure.attention import attention_probs
from conftest import randomize_


def test_cls_attention_shapes_and_mass(tiny):
    model = randomize_(tiny())
    x = torch.randn(2, 3, 32, 32)
    a = cait.cls_attention(model, x)
    assert a.block == 5 and a.grid == (8, 8)
    assert a.maps.shape == (2, 3, 8, 8) and a.patch_maps.shape == (2, 3, 8, 8)
    assert torch.equal(a.logits, model(x))
    assert bool((a.maps.sum((-2, -1)) <= 1 + 1e-5).all()) and bool((a.maps >= 0).all())
    assert a.to_pixels((32, 32)).shape == (2, 3, 32, 32) and a.to_pixels((32, 32), heads=False).shape == (2, 32, 32)


def test_merged_grid_is_mapped_back_onto_the_patches(tiny):
    model = cait.compress(randomize_(tiny()), 0.6, layout="h1,v2")
    a = cait.cls_attention(model, torch.randn(1, 3, 32, 32), block=-1)
    assert a.grid == (4, 4) and a.patch_maps.shape == (1, 3, 8, 8)
    assert torch.equal(a.patch_maps[0, :, 2:4, 6:8], a.maps[0, :, 1:2, 3:4].expand(3, 2, 2))
    early = cait.cls_attention(model, torch.randn(1, 3, 32, 32), block=0)
    assert early.grid == (8, 8)


@pytest.mark.parametrize("compressed", [False, True])
def test_recomputed_probabilities_reproduce_the_attention_output(tiny, compressed):
    model = randomize_(tiny())
    if compressed:
        model = cait.compress(model, 0.5)
    attn = model.blocks[3].attn
    x = torch.randn(2, 17, 48)
    probs = attention_probs(attn, x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    if compressed:
        _, _, v = attn.qkv_heads(x)
    else:
        v = attn.qkv(x).reshape(2, 17, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
    out = (probs @ v).transpose(1, 2).reshape(2, 17, -1)
    torch.testing.assert_close(attn.proj(out), attn(x), rtol=1e-4, atol=1e-5)


def test_block_out_of_range(tiny):
    with pytest.raises(IndexError, match="block 6 out of range"):
        cait.cls_attention(tiny(), torch.randn(1, 3, 32, 32), block=6)


def test_attention_in_mask_bounds_and_uniform_baseline():
    from cait.measure.attention import ClsAttention
    B, H = 2, 3
    masks = torch.zeros(B, 32, 32, dtype=torch.bool)
    masks[:, :8, :8] = True                                         # exactly patch (0, 0) of an 8×8 grid (4 px patches)
    focused = torch.zeros(B, H, 8, 8)
    focused[:, :, 0, 0] = 0.7                                       # all attention on the object patch
    uniform = torch.full((B, H, 8, 8), 0.01)
    half = torch.zeros(B, H, 8, 8)
    half[:, :, 0, 0], half[:, :, 7, 7] = 0.3, 0.3
    for maps, expected in ((focused, 1.0), (uniform, 64 / 1024), (half, 0.5)):
        att = ClsAttention(maps, maps, torch.zeros(B, 2), 5, (8, 8))
        torch.testing.assert_close(cait.attention_in_mask(att, masks), torch.full((B,), expected))
        assert cait.attention_in_mask(att, masks, heads=True).shape == (B, H)
    with pytest.raises(ValueError, match="1 masks for 2"):
        cait.attention_in_mask(att, masks[:1])


def test_a_map_head_s_attention_is_what_it_pools_with():
    """SigLIP's attention-pooling (MAP) head: the maps of a model without a class token at its last block are the
    head's query's attention, and those probabilities, applied to its values and run through its projection and MLP,
    give the head's own output; earlier blocks show the attention each patch receives."""
    import timm
    import cait
    from cait.measure.attention import cls_attention, map_attention_probs
    from conftest import randomize_

    model = randomize_(timm.create_model("vit_base_patch16_siglip_224", depth=2, embed_dim=48, num_heads=3,
                                         img_size=64, num_classes=5).eval(), std=0.2)
    twin = cait.compress(model, 0.3, layout="h1", round_to=4)
    x = torch.randn(2, 3, 64, 64)
    for m in (model, twin):
        pool, seen = m.attn_pool, {}
        hook = pool.register_forward_hook(lambda mod, a, out: seen.update(x=a[0], out=out))
        with torch.no_grad():
            att, first = cls_attention(m, x, block=-1), cls_attention(m, x, block=0)
            hook.remove()
            probs = map_attention_probs(pool, seen["x"])                                   # (B, H, 1, N)
            B, N, C = seen["x"].shape
            v = pool.kv(seen["x"]).reshape(B, N, 2, pool.num_heads, -1)[:, :, 1].transpose(1, 2)
            y = pool.proj((probs @ v).transpose(1, 2).reshape(B, 1, C))
            y = (y + pool.mlp(pool.norm(y)))[:, 0]
        torch.testing.assert_close(y, seen["out"], rtol=1e-4, atol=1e-5)
        assert att.query == "map" and first.query == "mean"
        torch.testing.assert_close(att.maps.flatten(2).sum(-1), torch.ones(2, 3))
