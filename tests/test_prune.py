"""Prune and fold (paper §III-C): a folded compact model equals its masked twin, ``PrunedAttention`` keeps the
original scale, bad masks are refused."""
import copy

import pytest
import timm
import torch
import cait
from cait.models.spec import describe
from cait.compress.select import ChannelMask
from conftest import randomize_


from cait.models.compactors import ffn_compactor  # noqa: E402


def random_consistent_mask(spec, seed, p=0.4):
    """A random S that keeps head-level consistency: each head drops the same number of q/k and v channels."""
    g = torch.Generator().manual_seed(seed)
    qk, v, ffn = [], [], []
    for b in spec.blocks:
        for out, d in ((qk, b.qk_dim), (v, b.v_dim)):
            n = int(torch.randint(0, int(p * d) + 1, (1,), generator=g))
            n = 0 if out is qk and b.rope else n                               # RoPE: CDCP keeps q/k whole
            m = torch.zeros(b.heads, d, dtype=torch.bool)
            for h in range(b.heads):
                m[h, torch.randperm(d, generator=g)[:n]] = True              # different channels per head
            out.append(m)
        ffn.append(torch.rand(b.ffn_dim, generator=g) < p)
    return ChannelMask(qk, v, ffn)


def zero_masked_rows_(model, mask):
    """The compactor model with S's rows zeroed — what training converges to before pruning."""
    with torch.no_grad():
        for l, block in enumerate(model.blocks):
            qkv = block.attn.qkv
            qkv.q[mask.qk[l]] = 0
            qkv.k[mask.qk[l]] = 0
            qkv.v[mask.v[l]] = 0
            ffn_compactor(block.mlp).q[mask.ffn[l]] = 0


@pytest.mark.parametrize("seed,layout", [(0, ""), (1, "h1,v3"), (2, "v0,h2,v4")])
def test_folded_compact_model_equals_masked_compactor_model(tiny, seed, layout):
    model = cait.add_compactors(cait.apply_atme(randomize_(tiny(seed)), layout))
    randomize_(model, seed=seed + 100, std=0.1)                              # compactors far from identity
    mask = random_consistent_mask(describe(model), seed)
    zero_masked_rows_(model, mask)
    x = torch.randn(3, 3, 32, 32)
    masked_out = model(x)
    compact = cait.prune(copy.deepcopy(model), mask)
    assert not cait.has_compactors(compact)
    assert [(b.qk_dim, b.v_dim, b.ffn_dim) for b in describe(compact).blocks] == mask.widths()
    torch.testing.assert_close(compact(x), masked_out, rtol=1e-4, atol=1e-5)
    # The manual attention path agrees with the fused one.
    for b in compact.blocks:
        b.attn.fused_attn = False
    torch.testing.assert_close(compact(x), masked_out, rtol=1e-4, atol=1e-5)


def test_pruned_attention_keeps_original_scale(tiny):
    model = randomize_(tiny())
    mask = random_consistent_mask(describe(model), 3, p=0.6)
    compact = cait.prune(copy.deepcopy(model), mask)
    for b in compact.blocks:
        assert b.attn.scale == 16 ** -0.5                                     # d_h of the original, not qk_dim


def test_prune_refuses_inconsistent_or_empty_masks(tiny):
    model = tiny()
    spec = describe(model)
    mask = ChannelMask.empty_like(cait.weight_scores(model))
    mask.qk[2][0, 3] = True                                                  # only head 0 loses a channel
    with pytest.raises(ValueError, match="block 2: heads keep different q/k widths"):
        cait.prune(copy.deepcopy(model), mask)
    mask = ChannelMask.empty_like(cait.weight_scores(model))
    mask.ffn[1][:] = True
    with pytest.raises(ValueError, match="removes every channel"):
        cait.prune(copy.deepcopy(model), mask)
    assert spec == describe(model)                                           # refused masks leave it untouched


def test_compress_with_rounding_equals_its_masked_twin(tiny):
    model = randomize_(tiny())
    compact = cait.compress(model, 0.5, round_to=4)
    assert all(w % 4 == 0 for b in describe(compact).blocks for w in (b.qk_dim, b.v_dim, b.ffn_dim))
    assert cait.count_flops(compact) <= 0.5 * cait.count_flops(model)


def test_pruned_attention_pads_to_one_width_for_the_fused_kernel_without_changing_outputs():
    """q/k ≠ v leaves PyTorch's fast kernel; zero padding keeps it, exactly (zero q/k channels add nothing to q·kᵀ,
    zero v channels are sliced off), and FLOPs are still the model's own multiply-adds."""
    import copy
    from cait.layers.pruned_attention import PrunedAttention, exact_widths
    torch.manual_seed(0)
    x = torch.randn(2, 17, 48)
    for qk, v in ((5, 9), (9, 5), (7, 7)):
        attn = PrunedAttention(48, 3, qk_dim=qk, v_dim=v, scale=16 ** -0.5).eval()
        plain = copy.deepcopy(attn)
        plain.pad_to_kernel = False
        manual = copy.deepcopy(attn)
        manual.fused_attn = False
        with torch.no_grad():
            torch.testing.assert_close(attn(x), plain(x), rtol=0, atol=2e-6)
            torch.testing.assert_close(attn(x), manual(x), rtol=0, atol=2e-6)
    model = cait.compress(timm.create_model(cait.TEST_MODEL).eval(), 0.5)
    widths = [(b.attn.qk_dim, b.attn.v_dim) for b in model.blocks]
    assert any(q != v for q, v in widths)                                   # the case the padding is for
    assert cait.count_flops(model) == cait.analytic_flops(model)           # the padding is not counted
    assert all(b.attn.pad_to_kernel for b in model.blocks)                 # ... and is back on after counting
    with exact_widths(model):
        assert not any(b.attn.pad_to_kernel for b in model.blocks)
