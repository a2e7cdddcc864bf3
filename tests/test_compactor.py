"""Compactors (paper §III-C): identity at insertion, folding back into timm Linears."""
import pytest
import torch
import cait
from cait.layers.compactor import CompactorLinear, CompactorQKV
from conftest import randomize_


def test_identity_compactors_change_nothing(tiny):
    model = cait.apply_atme(randomize_(tiny()), "h1,v3")
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    cait.add_compactors(model)
    assert isinstance(model.blocks[0].attn.qkv, CompactorQKV) and isinstance(model.blocks[0].mlp.fc1, CompactorLinear)
    assert model.blocks[0].attn.qkv.q.shape == (3, 16, 16) and model.blocks[0].mlp.fc1.q.shape == (192, 192)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    names = [n for n, _ in cait.iter_compactors(model)]
    assert len(names) == 6 * 4 and names[0] == "blocks.0.attn.qkv.q"
    with pytest.raises(ValueError, match="already has compactors"):
        cait.add_compactors(model)


def test_fold_compactors_keeps_timm_modules_and_outputs(tiny):
    from timm.layers import Attention
    model = cait.add_compactors(randomize_(tiny()))
    randomize_(model, seed=5, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    cait.fold_compactors(model)
    assert not cait.has_compactors(model) and type(model.blocks[0].attn) is Attention
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
