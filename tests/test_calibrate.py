"""Calibrated training-free compression: calibration images, Fisher scores, the least-squares refit, the command."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import cait
from cait.compress.importance import fisher_scores, per_flop
from cait.compress.refit import refit_
from cait.cli.compress import main as compress_main
from cait.data.calibration import calibration_images
from cait.data.datasets import DataError
from conftest import randomize_


@pytest.fixture
def model(tiny):
    return randomize_(tiny(num_classes=8), std=0.05)


def test_calibration_sources_give_normalised_model_sized_batches(model, tmp_path):
    for name in ("default", "photos", "synthetic"):
        x = calibration_images(name, 6, model, seed=1)
        assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
        assert torch.equal(x, calibration_images(name, 6, model, seed=1))               # seeded
    assert not torch.equal(calibration_images("photos", 4, model, 0), calibration_images("photos", 4, model, 1))
    # A directory of images (nested), with one broken file that is skipped.
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(tmp_path / "a" / "b" / f"{i}.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    assert calibration_images(tmp_path, 3, model).shape == (3, 3, 32, 32)
    with pytest.raises(DataError, match="3 readable images found, 4 calibration images asked for"):
        calibration_images(tmp_path, 4, model)
    with pytest.raises(DataError, match="no such directory"):
        calibration_images(tmp_path / "missing", 4, model)
    with pytest.raises(DataError, match=r"must be \(N, 3, 32, 32\)"):
        calibration_images(torch.zeros(4, 3, 16, 16), 4, model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(5, 3, 32, 32), torch.zeros(5)),
                                         batch_size=2)
    assert calibration_images(loader, 5, model).shape == (5, 3, 32, 32)
    with pytest.raises(DataError, match="5 calibration images, 6 asked for"):
        calibration_images(loader, 6, model)


def test_fisher_is_zero_for_channels_that_cannot_change_the_output(model):
    """A unit whose outgoing weights are zero cannot move the loss: its Fisher is exactly 0; others are not."""
    with torch.no_grad():
        model.blocks[2].mlp.fc2.weight[:, 5] = 0                    # FFN channel 5 of block 2
        model.blocks[1].attn.proj.weight[:, 16 + 3] = 0             # v channel 3 of head 1 in block 1
        model.blocks[3].attn.qkv.weight[7] = 0                      # q channel 7 of head 0 in block 3 ...
        model.blocks[3].attn.qkv.bias[7] = 0                        # ... is 0 for every token
    x = torch.randn(12, 3, 32, 32)
    s = fisher_scores(model, x, model(x).argmax(-1), batch_size=5)
    assert s.ffn[2][5] == 0 and s.v[1][1, 3] == 0 and s.q[3][0, 7] == 0 and torch.equal(s.q[3], s.k[3])
    assert (s.ffn[2] > 0).sum() == 191 and (s.v[1] > 0).sum() == 47
    # Summed over images: the same whatever the batch size.
    s2 = fisher_scores(model, x, model(x).argmax(-1), batch_size=12)
    assert torch.allclose(s.ffn[0], s2.ffn[0], rtol=1e-4) and torch.allclose(s.v[4], s2.v[4], rtol=1e-4)
    ratio = per_flop(s, cait.describe(model))
    assert torch.allclose(ratio.ffn[0] * cait.describe(model).blocks[0].ffn_unit_flops(), s.ffn[0])


def test_refit_of_an_unchanged_model_changes_nothing_and_refits_every_branch(model):
    twin = copy.deepcopy(model)
    x = torch.randn(40, 3, 32, 32)
    report = refit_(twin, model, x, batch_size=16, ridge=1e-9)
    y = torch.randn(8, 3, 32, 32)
    assert torch.allclose(twin(y), model(y), atol=1e-4)
    assert all(b["refit"] == ["proj", "fc2"] and b["mse_after"] < 1e-9 for b in report["blocks"])


def test_refit_brings_a_merged_and_pruned_twin_back_towards_the_original(model):
    x, held_out = torch.randn(64, 3, 32, 32), torch.randn(64, 3, 32, 32)
    preview = cait.compress(model, 0.5, layout="h2,v4")
    twin = copy.deepcopy(preview)
    report = refit_(twin, model, x)
    assert [b["refit"] for b in report["blocks"]][2] == ["fuse", "proj", "fc2"]
    assert all(b["mse_after"] <= b["mse_before"] for b in report["blocks"])
    with torch.no_grad():
        ref = model(held_out)
        err = lambda m: float(((m(held_out) - ref) ** 2).mean())  # noqa: E731
        assert err(twin) < 0.5 * err(preview)
    with pytest.raises(ValueError, match="same depth and grid"):
        refit_(twin, cait.create_model("deit_tiny_patch16_224", pretrained=False)[0], x)


def test_calibrated_compress_meets_the_target_and_says_how(model):
    x = torch.randn(48, 3, 32, 32)
    twin = cait.compress(model, 0.5, calibration=x, calibration_size=48, round_to=4)
    assert 1 - cait.count_flops(twin) / cait.count_flops(model) >= 0.5
    assert all(w % 4 == 0 for b in cait.describe(twin).blocks for w in (b.qk_dim, b.v_dim, b.ffn_dim))
    meta = twin.cait_meta
    assert meta.kind == "calibrated" and meta.calibration.images == 48 and "calibrated" in meta.note
    with pytest.raises(DataError, match="no such directory"):
        cait.compress(model, 0.5, calibration="nowhere", calibration_size=8)


def test_command_line_writes_a_loadable_checkpoint(tmp_path, capsys, model):
    src = cait.save_pretrained(model, tmp_path / "original")
    out = tmp_path / "twin"
    assert compress_main(["--model", str(src), "--flops-reduction", "0.4", "--calibration", "synthetic",
                          "--calibration-size", "16", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["calibration"]["images"] == 16 and summary["flops"] <= 0.6 * summary["base_flops"]
    loaded = cait.load_pretrained(out)
    assert loaded.cait_meta.calibration.source == "synthetic"
    assert compress_main(["--model", str(src), "--flops-reduction", "1.5", "--output", str(out)]) == 2
    assert "error: flops_reduction must be in [0, 1)" in capsys.readouterr().err
    assert compress_main(["--model", str(src), "--flops-reduction", "0.4", "--calibration", "nowhere",
                          "--output", str(out)]) == 2
    assert "nowhere: no such directory" in capsys.readouterr().err
