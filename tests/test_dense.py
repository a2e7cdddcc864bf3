"""Dense transfer: every backbone's blocks as maps on the patch grid, the baselines' merges and drops undone as
their papers do, and the segmenter on top (a probe leaves its backbone untouched)."""
import copy

import pytest
import torch

import cait
from cait.baselines.token_pruning import (apply_token_pruning, default_locations, token_counts,
                                          token_pruning_flops, token_pruning_schedule)
from cait.baselines.tome import apply_tome, tome_schedule
from cait.dense.features import backbone_kind, default_blocks, dense_features
from cait.dense.segmenter import Segmenter
from cait.measure.segmentation import evaluate_segmentation
from conftest import randomize_

BLOCKS = [0, 2, 3, 5]


@pytest.fixture(scope="module")
def base():
    import timm
    torch.manual_seed(0)
    return randomize_(timm.create_model(cait.TEST_MODEL, num_classes=8).eval(), std=0.05)


def _variants(base):
    tome, pruned = copy.deepcopy(base), copy.deepcopy(base)
    return {"original": base, "cait": cait.compress(base, 0.5), "atme": cait.apply_atme(copy.deepcopy(base), "h2,v4"),
            "cdcp": cait.compress(base, 0.5, layout=""), "tome": apply_tome(tome, tome_schedule(tome, 0.5)),
            "token_pruning": apply_token_pruning(pruned, token_pruning_schedule(pruned, 0.5))}


def test_every_backbone_gives_its_blocks_on_the_patch_grid(base):
    x = torch.randn(2, 3, 32, 32)
    kinds = {}
    for name, model in _variants(base).items():
        with torch.no_grad():
            maps = dense_features(model, x, BLOCKS)
        assert [tuple(m.shape) for m in maps] == [(2, 48, 8, 8)] * 4, name
        kinds[name] = backbone_kind(model)
    assert kinds == {"original": "grid", "cait": "atme", "atme": "atme", "cdcp": "grid", "tome": "tome",
                     "token_pruning": "token_pruning"}
    assert default_blocks(12) == [2, 5, 8, 11] and default_blocks(6) == [0, 2, 3, 5]


def test_an_atme_maps_merged_tokens_onto_the_patches_they_cover(base):
    model = cait.apply_atme(copy.deepcopy(base), "h1")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        dense = dense_features(model, x, [3])[0]                                   # (1, C, 8, 8)
        merged = model.forward_intermediates(x, indices=[3], intermediates_only=True)[0]   # (1, C, 8, 4)
    assert torch.equal(dense[..., 0::2], merged) and torch.equal(dense[..., 1::2], merged)


def test_tome_undone_gives_each_patch_the_token_that_absorbed_it(base):
    x = torch.randn(2, 3, 32, 32)
    plain = dense_features(base, x, [1, 5])
    with torch.no_grad():
        assert all(torch.allclose(a, b, atol=1e-5)
                   for a, b in zip(dense_features(apply_tome(copy.deepcopy(base), 0), x, [1, 5]), plain))
        model = apply_tome(copy.deepcopy(base), 6)
        model.tome.trace_source = True
        model(x)
    source, size = model.tome.source, model.tome.size[:, 1:, 0]
    assert torch.equal(source.sum(dim=1), torch.ones(2, 64))                       # every patch in exactly one token
    assert torch.equal(source.sum(dim=2), size)                                    # a token holds `size` patches
    with torch.no_grad():
        maps = dense_features(model, x, [5])[0].flatten(2).transpose(1, 2)        # (2, 64, C)
    assert len({tuple(v.tolist()) for v in maps[0]}) == int(size.shape[1])        # as many values as tokens


def test_token_pruning_counts_flops_as_fvcore_and_reaches_its_target(base):
    rate = token_pruning_schedule(base, 0.5)
    model = apply_token_pruning(copy.deepcopy(base), rate)
    assert cait.count_flops(model) == token_pruning_flops(model)
    assert 0.5 <= 1 - token_pruning_flops(model) / cait.count_flops(base) < 0.52
    assert token_counts(196, 12, 0.5, default_locations(12))[3] == (197, 100, 98)
    assert default_locations(12) == [3, 6, 9]
    with pytest.raises(ValueError, match="keep rate must be in"):
        apply_token_pruning(copy.deepcopy(base), 0.0)
    with pytest.raises(ValueError, match="already patched"):
        apply_token_pruning(cait.apply_atme(copy.deepcopy(base), "h2"), 0.5)


def test_pruned_positions_keep_their_value_from_the_last_block_that_kept_them(base):
    model = apply_token_pruning(copy.deepcopy(base), 0.5, locations=[2])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before, after = dense_features(model, x, [1, 4])                           # block 2 prunes
        pruned_positions = set(range(64)) - set(model.pruning.positions[0].tolist())
        plain = dense_features(base, x, [1])[0]
    assert len(pruned_positions) == 32 and torch.allclose(before, plain, atol=1e-5)
    # A token dropped at block 2 never went through block 2's MLP: its map value stays block 1's output.
    flat_before, flat_after = before.flatten(2)[0], after.flatten(2)[0]
    for p in pruned_positions:
        assert torch.equal(flat_after[:, p], flat_before[:, p])
    kept = sorted(set(range(64)) - pruned_positions)
    assert not torch.allclose(flat_after[:, kept], flat_before[:, kept])


def test_a_probe_trains_its_decoder_and_leaves_the_backbone_as_it_was(base):
    twin = cait.compress(base, 0.5)
    seg = Segmenter(twin, 9)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    opt = torch.optim.AdamW(seg.decoder_modules().parameters(), lr=1e-2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 9, (4, 32, 32))
    seg.train()
    assert not twin.training                                                        # the probe's backbone stays in eval
    loss = torch.nn.functional.cross_entropy(seg(x), y)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in twin.parameters())
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in before.items())
    assert seg(x).shape == (4, 9, 32, 32)
    end_to_end = Segmenter(copy.deepcopy(twin), 9, frozen=False)
    torch.nn.functional.cross_entropy(end_to_end(x), y).backward()
    assert all(p.grad is not None for p in end_to_end.backbone.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="four different blocks"):
        Segmenter(twin, 9, blocks=[1, 2])
    with pytest.raises(ValueError, match="four different blocks"):
        Segmenter(twin, 9, blocks=[1, 2, 3, -5])                         # -5 is block 1 of 6


def test_miou_and_per_class_iou_on_predictions_known_by_hand():
    class Fixed(torch.nn.Module):                                         # predicts class 1 on the left half
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 3, 4, 4)
            logits[:, 1, :, :2] = 1
            logits[:, 0, :, 2:] = 1
            return logits

    target = torch.zeros(4, 4, dtype=torch.long)
    target[:, :1] = 1                                                     # class 1: 4 px true, 8 predicted
    target[0, 3] = 2                                                      # class 2: 1 px, never predicted
    data = [(torch.zeros(3, 4, 4), target)]
    s = evaluate_segmentation(Fixed(), data, 3)
    # class 0: true 11 px, predicted 8, overlap 7 → 7/12; class 1: 4/8; class 2: 0/1.
    assert s.per_class_iou == [round(100 * 7 / 12, 2), 50.0, 0.0]
    assert s.miou == round(sum(s.per_class_iou) / 3, 2) and s.pixel_accuracy == round(100 * 11 / 16, 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        evaluate_segmentation(Fixed(), data, 2)


def test_a_copy_of_a_patched_baseline_runs_on_its_own(base):
    """The qkv hooks keep their output on the module, not in a closure over the model's state: a deep copy of a
    ToMe or token-pruning model runs as the model does (it used to write into the original's state)."""
    x = torch.randn(2, 3, 32, 32)
    for model in (apply_tome(copy.deepcopy(base), 4), apply_token_pruning(copy.deepcopy(base), 0.5)):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), model(x))
            torch.testing.assert_close(dense_features(twin, x, BLOCKS)[3], dense_features(model, x, BLOCKS)[3])
