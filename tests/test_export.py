"""python -m cait.export: every format (ONNX fp32 and int8, TorchScript, torch.export) with parity, and clear
failures."""
import json

import pytest
import torch

import cait
from cait.cli.export import main
from cait.io.export import ExportError, FORMATS, export_model
from conftest import randomize_


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    import timm
    model = randomize_(timm.create_model(cait.TEST_MODEL, num_classes=8).eval(), std=0.05)
    return cait.save_pretrained(cait.compress(model, 0.5, layout="h2,v4"), tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_exports_with_parity(checkpoint, fmt, capsys):
    assert main([str(checkpoint), "--format", fmt]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes"] == (checkpoint / FORMATS[fmt]).stat().st_size and out["top1_agreement"] == 1.0
    assert out["runtime"] == {"onnx": "onnxruntime", "onnx-int8": "onnxruntime", "torchscript": "torch.jit",
                              "exported": "torch.export"}[fmt]
    if fmt == "onnx-int8":                  # int8 weights (the tiny model is mostly embeddings), within the bound
        if not (checkpoint / "model.onnx").exists():    # the fp32 case ran on another worker, or not yet
            assert main([str(checkpoint), "--format", "onnx"]) == 0
            capsys.readouterr()
        assert 0 < out["relative_diff"] <= 0.05 and out["bytes"] < 0.75 * (checkpoint / "model.onnx").stat().st_size
        assert sorted(p.name for p in checkpoint.glob("*.onnx*")) == ["model.int8.onnx", "model.onnx"]
    else:
        assert out["max_abs_diff"] <= 1e-4


def test_parity_failures_and_bad_input_are_errors(checkpoint, tmp_path, capsys):
    model = cait.load_pretrained(checkpoint)
    with pytest.raises(ExportError, match="differs from PyTorch by"):
        export_model(model, "torchscript", tmp_path / "m.pt", tolerance=-1.0)
    with pytest.raises(ExportError, match="onnx-int8 export differs from PyTorch by .*% of the largest logit"):
        export_model(model, "onnx-int8", tmp_path / "m.onnx", tolerance=0.0)
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(model, "tflite", tmp_path / "m")
    assert main([str(tmp_path / "nowhere"), "--format", "onnx"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
