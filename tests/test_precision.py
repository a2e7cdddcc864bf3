"""Precisions (cait.measure.precision): every model of the package — original, CAIT twin, ToMe, a pruned-only twin —
runs in fp32, bf16, bf16 autocast and int8, takes fp32 images, returns fp32 logits close to fp32's, and leaves the
model it was made from as it was."""
import copy

import pytest
import torch

import cait
from cait.baselines.tome import apply_tome, tome_schedule
from cait.measure.precision import PRECISIONS, PrecisionError, check_precision, in_precision, peak_gflops
from conftest import randomize_

# Relative error bound per precision on these random-weight models (largest |diff| / largest |fp32 logit|): bf16
# keeps 8 mantissa bits, int8 Linears quantise weights per tensor and activations per batch.
BOUND = {"fp32": 0.0, "bf16": 0.05, "bf16-autocast": 0.05, "int8": 0.15}


def variants(tiny):
    original = randomize_(tiny(), std=0.05)
    return {"original": original,
            "cait": cait.compress(original, 0.5, layout="h2,v4"),
            "cdcp": cait.compress(original, 0.4, layout=""),
            "tome": apply_tome(copy.deepcopy(original), tome_schedule(original, 0.3)).eval()}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_variant_runs_in_every_precision(tiny, precision):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, model in variants(tiny).items():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.inference_mode():
            ref = model(x)
            out = in_precision(model, precision)(x)
        assert out.dtype == torch.float32 and out.shape == ref.shape, name
        rel = float((out - ref).abs().max() / ref.abs().max())
        assert rel <= BOUND[precision], (name, precision, rel)
        after = model.state_dict()
        assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items()), name
        if precision == "int8":                       # the copy's Linears are quantised, the model's are not
            linears = [type(m).__module__ for m in in_precision(model, precision).modules()
                       if type(m).__name__ == "Linear"]
            assert linears and all("quantized.dynamic" in mod for mod in linears), linears
            assert all(type(m).__module__.startswith("torch.nn") for m in model.modules()
                       if type(m).__name__ == "Linear")

def test_bad_precisions_are_refused_by_name():
    with pytest.raises(PrecisionError, match="Precision: 'fp8' is not one of fp32, bf16, bf16-autocast, int8"):
        check_precision("fp8")
    with pytest.raises(PrecisionError, match="int8 .* runs on the CPU only"):
        check_precision("int8", "cuda")
    with pytest.raises(PrecisionError):
        peak_gflops("fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path: run where a GPU is lent")
def test_bf16_on_cuda(tiny):
    model = randomize_(tiny(), std=0.05).cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    out = in_precision(model, "bf16", "cuda")(x)
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    assert peak_gflops("bf16", "cuda", n=1024) > peak_gflops("fp32", "cuda", n=1024) / 4
