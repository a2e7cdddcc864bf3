"""Training a segmenter: a probe that learns and loads back with one call, resume after a kill, the baselines
saved with their settings, and clear refusals."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import cait
from cait.dense.features import backbone_kind
from cait.dense.checkpoint import CONFIG_NAME, DECODER_NAME, load_segmenter, segmenter_flops
from cait.dense.records import SegmentEvalRecord, SegmentStartRecord, SegmentTrainRecord
from cait.dense.train import SegmentConfig, segment
from cait.cli.dense import main
from cait.finetune.config import FinetuneError
from cait.finetune.records import of_type
from cait.finetune.rundir import read_log
from conftest import randomize_


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    import timm
    torch.manual_seed(0)
    model = randomize_(timm.create_model(cait.TEST_MODEL, num_classes=8).eval(), std=0.05)
    return str(cait.save_pretrained(model, tmp_path_factory.mktemp("bb") / "original"))


def _cfg(tmp_path, backbone_dir, **kw):
    return SegmentConfig(**{**dict(backbone=backbone_dir, steps=20, batch_size=4, train_size=32, val_size=8,
                                   eval_interval=10, log_interval=5, ckpt_interval=10, lr=3e-3,
                                   output=str(tmp_path / "run"), device="cpu"), **kw})


def test_a_probe_learns_logs_and_loads_back_with_one_call(tmp_path, backbone_dir):
    result = segment(_cfg(tmp_path, backbone_dir))
    records = read_log(tmp_path / "run")
    start = of_type(records, SegmentStartRecord)[0]
    train = of_type(records, SegmentTrainRecord)
    assert [r.step for r in train] == [5, 10, 15, 20] and train[-1].loss < train[0].loss
    assert [r.step for r in of_type(records, SegmentEvalRecord)] == [10, 20] and result.score.step == 20
    assert start.classes[0] == "background" and len(start.classes) == 9 and start.img_size == 32
    seg = load_segmenter(tmp_path / "run" / "segmenter")
    assert start.backbone_flops == cait.count_flops(seg.backbone) < start.segmenter_flops
    assert segmenter_flops(seg) == (start.backbone_flops, start.segmenter_flops)
    # The probe kept its backbone: it is the checkpoint it started from, weight for weight.
    original = cait.load_pretrained(backbone_dir)
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), seg.backbone.state_dict().values()))
    x = torch.randn(2, 3, 32, 32)
    from cait.dense.segmenter import Segmenter
    assert isinstance(seg, Segmenter) and seg(x).shape == (2, 9, 32, 32)
    assert seg.classes == start.classes


def test_kill_and_resume_reproduce_the_uninterrupted_run(tmp_path, backbone_dir):
    full = segment(_cfg(tmp_path / "a", backbone_dir))
    stopped = segment(_cfg(tmp_path / "b", backbone_dir, stop_at=10))
    assert stopped.score is None and stopped.step == 10
    resumed = segment(_cfg(tmp_path / "b", backbone_dir, resume=True))
    assert resumed.score.miou == full.score.miou
    a, b = (load_file(d / "run" / "segmenter" / DECODER_NAME) for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(FinetuneError, match="cannot resume a different configuration; changed: lr"):
        segment(_cfg(tmp_path / "b", backbone_dir, resume=True, lr=1e-2))
    with pytest.raises(FinetuneError, match="holds an earlier run"):
        segment(_cfg(tmp_path / "b", backbone_dir))


@pytest.mark.parametrize("baseline", ["tome", "token_pruning"])
def test_a_baseline_backbone_is_saved_with_its_settings(tmp_path, backbone_dir, baseline):
    segment(_cfg(tmp_path, backbone_dir, baseline=baseline, steps=4, eval_interval=100))
    cfg = json.loads((tmp_path / "run" / "segmenter" / CONFIG_NAME).read_text())
    assert cfg["backbone"]["baseline"] == baseline
    seg = load_segmenter(tmp_path / "run" / "segmenter")
    assert backbone_kind(seg.backbone) == baseline              # the loaded backbone runs the baseline, not the twin
    base_flops = cait.count_flops(cait.load_pretrained(backbone_dir))
    assert 0.5 <= 1 - segmenter_flops(seg)[0] / base_flops < 0.56               # the reduction it was made at


def test_bad_segmenters_and_settings_are_refused_by_name(tmp_path, backbone_dir):
    segment(_cfg(tmp_path, backbone_dir, steps=2, eval_interval=100))
    path = tmp_path / "run" / "segmenter"
    cfg = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps({**cfg, "num_classes": 5, "classes": ["a"] * 5}))
    with pytest.raises(cait.CheckpointError, match="saved with another segmenter.json"):
        load_segmenter(path)
    (path / CONFIG_NAME).write_text(json.dumps({**cfg, "blocks": [0, 1, 2, 99]}))
    with pytest.raises(cait.CheckpointError, match="'blocks' is missing or out of bounds"):
        load_segmenter(path)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    tensors = load_file(path / DECODER_NAME)
    save_file({k: v for k, v in list(tensors.items())[1:]}, path / DECODER_NAME,
              metadata={"format": "cait-studio/segmenter-v1", "config_sha256": "x"})
    with pytest.raises(cait.CheckpointError, match="another segmenter.json|names or shapes"):
        load_segmenter(path)
    (path / DECODER_NAME).write_bytes(b"not safetensors")
    with pytest.raises(cait.CheckpointError, match="corrupt or truncated"):
        load_segmenter(path)
    with pytest.raises(FinetuneError, match="multiple of 32"):
        segment(_cfg(tmp_path / "x", backbone_dir, segmentation_channels=48))
    with pytest.raises(FinetuneError, match="needs a layout"):
        segment(_cfg(tmp_path / "y", backbone_dir, baseline="atme"))


def test_the_command_line_prints_the_score_and_refuses_bad_input(tmp_path, backbone_dir, capsys):
    assert main(["--backbone", backbone_dir, "--steps", "2", "--batch-size", "2", "--train-size", "8",
                 "--val-size", "4", "--device", "cpu", "--output", str(tmp_path / "cli")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 2 and set(out["score"]) == {"step", "miou", "per_class_iou", "pixel_accuracy"}
    assert main(["--backbone", "bundled:nothing", "--output", str(tmp_path / "bad")]) == 2
    assert "error: --backbone bundled:nothing" in capsys.readouterr().err


def test_a_bundled_segmenter_refers_to_its_backbone_and_stores_a_half_precision_decoder(tmp_path):
    from cait.dense.checkpoint import BACKBONE_DIR, save_segmenter
    from cait.dense.segmenter import Segmenter
    from cait.io.bundled import bundled_pair
    pair = bundled_pair()
    if pair is None:
        pytest.skip("assets/ holds no bundled pair")
    twin = pair.load()[1]
    seg = Segmenter(twin, 9)
    path = save_segmenter(seg, tmp_path / "s", classes=[f"c{i}" for i in range(9)], bundled_backbone="cait",
                          dtype=torch.float16)
    assert not (path / BACKBONE_DIR).exists()                                    # no copy of the shipped twin
    assert (path / DECODER_NAME).stat().st_size < 3_000_000                      # the budget per decoder
    loaded = load_segmenter(path)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), loaded.backbone.state_dict().values()))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), seg.eval()(x), rtol=0, atol=5e-2)   # fp16 decoder weights
    with pytest.raises(ValueError, match="'original' or 'cait'"):
        save_segmenter(seg, tmp_path / "t", classes=["a"] * 9, bundled_backbone="mine")


def test_torchrun_two_processes_train_end_to_end_and_save_once(tmp_path, backbone_dir):
    """``torchrun -m cait.dense`` with two gloo processes, end to end: one log, one segmenter, whose backbone
    moved away from its checkpoint (the backbone's gradients are all-reduced, so both ranks step the same way)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cait.dense",
           "--backbone", backbone_dir, "--steps", "12", "--batch-size", "4", "--train-size", "32", "--val-size", "8",
           "--backbone-lr", "1e-3", "--lr", "3e-3", "--log-interval", "4", "--eval-interval", "100",
           "--ckpt-interval", "100", "--output", str(out), "--device", "cpu"]
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=240,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root)))
    assert r.returncode == 0, r.stderr[-3000:]
    printed = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and printed[0]["step"] == 12                       # rank 0 alone prints the score
    records = read_log(out)
    assert len(of_type(records, SegmentStartRecord)) == 1 and of_type(records, SegmentStartRecord)[0].world_size == 2
    assert [t.step for t in of_type(records, SegmentTrainRecord)] == [4, 8, 12]
    seg = load_segmenter(out / "segmenter")
    original = cait.load_pretrained(backbone_dir)
    moved = [not torch.equal(a, b) for a, b in zip(original.state_dict().values(), seg.backbone.state_dict().values())]
    assert any(moved)
    assert of_type(records, SegmentEvalRecord)[-1].miou == json.loads((out / "segmenter" / CONFIG_NAME).read_text()
                                                                       )["score"]["miou"]


def test_a_time_limit_stops_a_segmentation_run_with_its_state(tmp_path, backbone_dir):
    from cait.finetune.records import StoppedRecord
    result = segment(_cfg(tmp_path, backbone_dir, time_limit_s=0.0))
    assert result.score is None and result.step == 1
    stopped = of_type(read_log(tmp_path / "run"), StoppedRecord)
    assert [(s.step, s.reason) for s in stopped] == [(1, "time_limit")]
    assert (tmp_path / "run" / "train_state-0000001.json").is_file()
    assert not (tmp_path / "run" / "segmenter").exists()
