"""Eva models (EVA-02, DINOv3): rotary codes at merged positions, ATME at initialisation, FLOPs, CDCP pruning, ToMe.

Small configurations of timm's real classes: 3 blocks, C = 96, 3 heads of 32, an 8 × 8 patch grid, LayerScale at 1
(DINOv3's 1e-5 would make every block nearly the identity and the checks blind) and q/k/v weights ×8 (timm's
initialisation gives near-uniform attention, blind to positions).
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

from cait.layers.token_merge import pool_pairs
from cait.models.atme import apply_atme, block_ropes, model_token_grids
from cait.models.rope import rope_codes, rope_coords

EVA = {
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=112)),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=128, dynamic_img_size=False, init_values=1.0)),
}


def small_eva(family: str, **kw) -> torch.nn.Module:
    name, extra = EVA[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=3, embed_dim=96, num_heads=3, num_classes=10,
                              **extra, **kw).eval()
    with torch.no_grad():                     # sharp attention, so that positions (the rotary codes) matter
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8.0)
    return model


def centre_codes(model, grid_counts: tuple[int, int]) -> torch.Tensor:
    """Independent reference: the codes at the pair centres after ``(vertical, horizontal)`` merges, read from timm's
    own module. DINOv3: the merged grid's own centred coordinates are the centres (even sides). EVA-02: a module on a
    grid twice as fine, with the same reference grid, holds the centres at rows/columns ``2^(k+1)·i + 2^k − 1``."""
    rope, (H, W) = model.rope, tuple(model.patch_embed.grid_size)
    kv, kh = grid_counts
    if not isinstance(rope, RotaryEmbeddingCat):
        return rope.get_embed(shape=[H >> kv, W >> kh])
    fine = RotaryEmbeddingCat(dim=rope.dim, in_pixels=False, temperature=rope.temperature, feat_shape=[2 * H, 2 * W],
                              ref_feat_shape=list(rope.ref_feat_shape), rotate_half=rope.rotate_half)
    codes = fine.get_embed().view(2 * H, 2 * W, -1)
    rows = [2 ** (kv + 1) * i + 2 ** kv - 1 for i in range(H >> kv)]
    cols = [2 ** (kh + 1) * j + 2 ** kh - 1 for j in range(W >> kh)]
    return codes[rows][:, cols].flatten(0, 1)


@pytest.mark.parametrize("family", EVA)
def test_rope_codes_equal_timm_on_the_models_own_grid(family):
    model = small_eva(family)
    codes = rope_codes(model.rope, rope_coords(model.rope, tuple(model.patch_embed.grid_size)))
    assert torch.equal(codes.flatten(0, 1), model.rope.get_embed())


@pytest.mark.parametrize("family", EVA)
def test_merged_codes_are_the_pair_centres(family):
    model = apply_atme(small_eva(family), "h1,v2")
    ropes = block_ropes(model, model.rope.get_embed())
    assert model_token_grids(model) == [(8, 8), (8, 4), (4, 4)]
    torch.testing.assert_close(ropes[1], centre_codes(model, (0, 1)), rtol=0, atol=1e-6)
    torch.testing.assert_close(ropes[2], centre_codes(model, (1, 1)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", EVA)
def test_atme_at_init_equals_average_pair_with_centred_codes(family):
    """The issue's equivalence: a merged model whose fusions are at initialisation gives the output of the original
    blocks run on pair averages with the rotary codes of the pair centres (timm's module, computed independently)."""
    original = small_eva(family)
    merged = apply_atme(copy.deepcopy(original), "h1,v2")
    x = torch.randn(2, 3, *original.patch_embed.img_size)
    P, grids = original.num_prefix_tokens, [(8, 8), (8, 4)]
    with torch.no_grad():
        t, rope = original._pos_embed(original.patch_embed(x))
        t = original.norm_pre(t)
        codes = {0: rope, 1: centre_codes(original, (0, 1)), 2: centre_codes(original, (1, 1))}
        for i, (blk, direction) in enumerate(zip(original.blocks, (None, "h", "v"))):
            if direction:
                B, _, C = t.shape
                patches = pool_pairs(t[:, P:].reshape(B, *grids[i - 1], C), direction).reshape(B, -1, C)
                t = torch.cat([t[:, :P], patches], dim=1)
            t = blk(t, rope=codes[i])
        expected = original.norm(t)                                              # (B, P + 16, C)
        got = merged.forward_features(x)
        wrong = merged.norm(_run_with(merged, x, [rope, rope[:32], rope[:16]]))  # codes of the first rows
        torch.testing.assert_close(merged(x), original.forward_head(expected), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (wrong - expected).abs().max() > 0.05                                       # the codes matter


def _run_with(model, x, codes):
    t, _ = model._pos_embed(model.patch_embed(x))
    t = model.norm_pre(t)
    for blk, c in zip(model.blocks, codes):
        t = blk(t, rope=c)
    return t


@pytest.mark.parametrize("family", EVA)
def test_merged_eva_intermediates_on_block_grids_and_dense(family):
    model = apply_atme(small_eva(family), "h1,v2")
    x = torch.randn(1, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        inter = model.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
        dense = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True, dense=True)
        final, _ = model.forward_intermediates(x, indices=[2])
    assert [tuple(t.shape[2:]) for t in inter] == [(8, 8), (8, 4), (4, 4)]
    assert [tuple(t.shape[2:]) for t in dense] == [(8, 8), (8, 8)]
    torch.testing.assert_close(dense[1][..., ::2, ::2], inter[2])               # each merged token repeated
    torch.testing.assert_close(final, model.forward_features(x))


def _zero_masked_rows(model, mask):
    """The uncompressed model with every channel of S zeroed where it is produced (v rows of the q/k/v projection
    and their bias, the FFN's input rows: gate and value rows when gated)."""
    from timm.layers import GluMlp
    with torch.no_grad():
        for l, block in enumerate(model.blocks):
            attn, mlp, H = block.attn, block.mlp, block.attn.num_heads
            v_rows = torch.cat([torch.zeros(2 * mask.v[l].numel(), dtype=torch.bool), mask.v[l].flatten()])
            attn.qkv.weight[v_rows] = 0
            if attn.v_bias is not None:
                attn.v_bias[mask.v[l].flatten()] = 0
            f = mask.ffn[l]
            rows = torch.cat([f, f]) if isinstance(mlp, GluMlp) else f
            mlp.fc1.weight[rows] = 0
            if mlp.fc1.bias is not None:
                mlp.fc1.bias[rows] = 0
    return model


@pytest.mark.parametrize("family", EVA)
def test_compact_eva_equals_masked_model_and_fvcore(family):
    from cait.compress.importance import weight_scores
    from cait.compress.prune import prune
    from cait.compress.select import ChannelMask, select_channels
    from cait.measure.flops import count_flops
    from cait.models.spec import describe

    merged = apply_atme(small_eva(family), "h1,v2")
    spec = describe(merged)
    chosen = select_channels(weight_scores(merged), spec, int(0.8 * spec.flops()), round_to=8)
    assert not any(bool(m.any()) for m in chosen.qk) and chosen.size() > 0     # RoPE: q/k stay whole
    mask = ChannelMask.keep_all(spec)                                          # v and FFN channels of every block
    for l in range(len(spec.blocks)):
        mask.v[l][:, 3:11] = True
        mask.ffn[l][torch.arange(5, spec.blocks[l].ffn_dim, 3)] = True
    x = torch.randn(2, 3, *merged.patch_embed.img_size)
    with torch.no_grad():
        expected = _zero_masked_rows(copy.deepcopy(merged), mask).forward_features(x)
        compact = prune(copy.deepcopy(merged), mask)
        got = compact.forward_features(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert describe(compact).flops() == count_flops(compact) < spec.flops()
    assert describe(merged).flops() == count_flops(merged)


def test_eva_qk_pruning_is_refused():
    from cait.compress.prune import prune
    from cait.compress.select import ChannelMask
    from cait.models.spec import describe

    model = small_eva("dinov3")
    mask = ChannelMask.keep_all(describe(model))
    mask.qk[0][:, 0] = True
    with pytest.raises(ValueError, match="rotary"):
        prune(model, mask)


@pytest.mark.parametrize("family", EVA)
def test_tome_on_eva_matches_fvcore_and_keeps_token_positions(family):
    from cait.baselines.tome import apply_tome, tome_flops, tome_schedule
    from cait.measure.flops import count_flops

    original = small_eva(family)
    x = torch.randn(2, 3, *original.patch_embed.img_size)
    same = apply_tome(copy.deepcopy(original), 0)
    schedule = tome_schedule(original, 0.3)
    tome = apply_tome(copy.deepcopy(original), schedule)
    with torch.no_grad():
        torch.testing.assert_close(same(x), original(x))                       # r = 0: the original, exactly
        tome.tome.trace_source = True
        out = tome(x)
    state = tome.tome
    full = rope_coords(original.rope, tuple(original.patch_embed.grid_size)).flatten(0, 1)        # (L, 2)
    centroid = state.source @ full / state.source.sum(-1, keepdim=True)       # each token: mean of its patches
    torch.testing.assert_close(state.coords, centroid, rtol=1e-5, atol=1e-5)
    assert state.coords.shape[1] < full.shape[0] and torch.isfinite(out).all()
    tome.tome.trace_source = False
    assert tome_flops(tome) == count_flops(tome)


@pytest.mark.parametrize("family", EVA)
def test_cls_attention_of_eva_is_the_attention_the_block_computes(family):
    """The probabilities read for the maps, applied to v and projected, give the attention module's own output, for
    the original (EvaAttention) and a merged compact twin (PrunedAttention with RoPE) at a merged block."""
    import cait
    from cait.measure.attention import attention_probs, cls_attention
    from cait.models.parts import attention_qkv

    original = small_eva(family)
    twin = cait.compress(original, 0.5, layout="h1", round_to=8)
    x = torch.randn(2, 3, *original.patch_embed.img_size)
    for model in (original, twin):
        seen = {}
        attn = model.blocks[2].attn
        hook = attn.register_forward_hook(lambda m, a, kw, out: seen.update(x=a[0], out=out, **kw), with_kwargs=True)
        with torch.no_grad():
            model(x)
            hook.remove()
            probs = attention_probs(attn, seen["x"], seen["rope"])                       # (B, H, N, N)
            W, b = attention_qkv(attn) if hasattr(attn, "q_bias") else (attn.qkv.weight, attn.qkv.bias)
            B, N, _ = seen["x"].shape
            v = torch.nn.functional.linear(seen["x"], W, b)[..., -attn.proj.in_features:]
            v = v.reshape(B, N, attn.num_heads, -1).transpose(1, 2)
            out = attn.proj((probs @ v).transpose(1, 2).reshape(B, N, -1))
            att = cls_attention(model, x, block=2)
        torch.testing.assert_close(out, seen["out"], rtol=1e-4, atol=1e-5)
        assert att.maps.shape[-2:] == model_token_grids(model)[2] and att.query == "cls"
        torch.testing.assert_close(att.maps.flatten(2).sum(-1), probs[:, :, 0, 5 if family == "dinov3" else 1:].sum(-1))


@pytest.mark.parametrize("family", EVA)
def test_calibration_on_eva_runs_the_blocks_with_their_rotary_codes(family):
    """The refit runs the original's and the twin's blocks itself: an unmerged, unpruned twin (the same function)
    matches the original in every block (to float noise), which it cannot unless each block gets its rotary codes;
    a merged twin's refit lowers the error of every block after the merge. Fisher scores read an EVA-02 attention through one qkv module."""
    import cait
    from cait.compress.prune import prune
    from cait.compress.refit import refit_
    from cait.compress.select import ChannelMask
    from cait.models.spec import describe

    original = small_eva(family)
    images = torch.randn(24, 3, *original.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    same = prune(copy.deepcopy(original), ChannelMask.keep_all(describe(original)))
    report = refit_(same, original, images, batch_size=8)
    assert max(b["mse_before"] for b in report["blocks"]) < 1e-4          # float noise; without the codes ~1e-2
    twin = cait.compress(original, 0.4, layout="h1", calibration=images, calibration_size=24, batch_size=8)
    assert twin.cait_meta.kind == "calibrated" and twin.cait_meta.calibration.channels in ("fisher", "weight")
    merged = prune(cait.apply_atme(copy.deepcopy(original), "h1"), ChannelMask.keep_all(describe(original)))
    for b in refit_(merged, original, images, batch_size=8)["blocks"][1:]:          # the blocks after the merge
        assert b["mse_after"] < b["mse_before"]


@pytest.mark.parametrize("family", EVA)
def test_tome_dense_intermediates_on_eva_cover_the_patch_grid(family):
    from cait.baselines.tome import apply_tome, tome_dense_intermediates
    from cait.models.deit import block_outputs

    original = small_eva(family)
    x = torch.randn(2, 3, *original.patch_embed.img_size)
    with torch.no_grad():
        P = original.num_prefix_tokens
        unmerged = block_outputs(original, x, [1])[0][:, P:]                         # (B, 64, C)
        expected = original.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        torch.testing.assert_close(unmerged.transpose(1, 2).reshape(expected.shape), expected)
        tome = apply_tome(copy.deepcopy(original), [4, 4, 4])
        dense = tome_dense_intermediates(tome, x, [0, 2])
    assert [tuple(t.shape) for t in dense] == [(2, 96, 8, 8)] * 2 and all(torch.isfinite(t).all() for t in dense)


def test_cdcp_fine_tuning_of_an_eva_by_name_then_label_free_from_its_checkpoint(tmp_path):
    """A labelled CDCP run of EVA-02-T (SwiGLU, q/v biases, RoPE) by its timm name, then a label-free run taught by
    the checkpoint it wrote: each ends at the FLOPs target, S at exactly zero, the compact model equal to the
    masked one, q/k of every head kept whole, and a compact checkpoint that loads."""
    import cait
    from cait.finetune.config import FinetuneConfig
    from cait.finetune.engine import finetune

    common = dict(data="synthetic", flops_reduction=0.5, steps=6, batch_size=4, img_size=56, eval_interval=6,
                  log_interval=3, ckpt_interval=6, val_size=16, synthetic_size=64, mask_interval=1, cdcp_warmup=0.2,
                  cdcp_ramp=0.5, lr=1e-3, device="cpu")
    first = finetune(FinetuneConfig(model="eva02_tiny_patch14_224", pretrained=False, output=str(tmp_path / "a"),
                                    **common))
    second = finetune(FinetuneConfig(model=str(tmp_path / "a" / "teacher"), labels="none",
                                     output=str(tmp_path / "b"), **common))
    for summary, run in ((first, "a"), (second, "b")):
        assert summary.flops_reduction >= 0.5 and summary.max_removed_row_norm == 0.0
        assert summary.top1_student == summary.top1_masked
        compact = cait.load_pretrained(tmp_path / run / "compact")
        assert type(compact).__name__ == "ATMEEva" and cait.count_flops(compact) == summary.flops
        assert all(b.attn.qk_dim == 64 for b in compact.blocks)                 # EVA-02-T heads of 64
    assert second.agreement is not None


def test_a_dinov3_saved_by_timm_on_the_hub_fine_tunes_by_its_hf_hub_id(tmp_path, monkeypatch):
    """``python -m cait.finetune --model hf-hub:…`` (issue "CAIT for the ViTs people compress today", item 4: one
    model source for the library, the command lines and the app): a DINOv3 fine-tuned elsewhere and saved by timm
    into the local Hugging Face cache, offline, is the teacher of a label-free run; its size and classes come from
    the repository."""
    from timm.models._hub import save_for_hf
    from cait.finetune.config import FinetuneConfig
    from cait.finetune.engine import finetune
    from conftest import randomize_
    from test_hub import _cache_repo

    snapshot = _cache_repo(tmp_path, monkeypatch, "someone/dinov3-finetuned")
    model = randomize_(timm.create_model("vit_small_patch16_dinov3", depth=2, embed_dim=96, num_heads=3, img_size=64,
                                         num_classes=8, dynamic_img_size=False).eval(), std=0.05)
    save_for_hf(model, str(snapshot), safe_serialization=True)
    summary = finetune(FinetuneConfig(model="hf-hub:someone/dinov3-finetuned", data="synthetic", labels="none",
                                      flops_reduction=0.4, steps=4, batch_size=4, eval_interval=4, log_interval=2,
                                      ckpt_interval=4, val_size=16, synthetic_size=48, mask_interval=1,
                                      cdcp_warmup=0.25, cdcp_ramp=0.5, device="cpu", output=str(tmp_path / "run")))
    assert summary.flops_reduction >= 0.4 and summary.agreement is not None and summary.held_out == 16


@pytest.mark.parametrize("family", EVA)
def test_dense_features_of_an_eva_and_its_twins_lie_on_the_patch_grid(family):
    """What a segmenter reads (cait.dense.features): the original, its CAIT twin and ToMe, each block's output on the
    full 8 × 8 patch grid."""
    import cait
    from cait.baselines.tome import apply_tome, tome_schedule
    from cait.dense.features import dense_features

    original = small_eva(family)
    x = torch.randn(2, 3, *original.patch_embed.img_size)
    models = {"original": original, "cait": cait.compress(original, 0.5, round_to=8),
              "tome": apply_tome(copy.deepcopy(original), tome_schedule(original, 0.3))}
    with torch.no_grad():
        shapes = {k: [tuple(t.shape) for t in dense_features(m, x, [0, -1])] for k, m in models.items()}
    assert all(v == [(2, 96, 8, 8)] * 2 for v in shapes.values()), shapes


def test_an_eva_twin_exports_to_onnx_with_parity(tmp_path):
    """ONNX through ``cait.export`` (the dynamo exporter, run under ONNX Runtime): the merged tokens' rotary codes
    are computed inside the graph, and the outputs agree with PyTorch's."""
    import cait
    from cait.io.export import export_model

    pytest.importorskip("onnxruntime")
    report = export_model(cait.compress(small_eva("dinov3"), 0.5, round_to=8), "onnx", tmp_path / "twin.onnx")
    assert report["relative_diff"] < 1e-4 and report["top1_agreement"] == 1.0
