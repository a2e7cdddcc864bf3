"""Running a model in the precision it would be deployed in, and the device's own limit in that precision.

:func:`in_precision` turns any model of this package (original, CAIT twin, ToMe) into one that takes the usual fp32
images ``(B, 3, H, W)`` and returns fp32 logits ``(B, classes)``, computing in:

=================  ==========================================================================================
``fp32``           the model as it is
``bf16``           bf16 weights and activations (``model.to(torch.bfloat16)``); on a CPU with AVX-512 BF16 the
                   matmuls run on its bf16 units
``bf16-autocast``  fp32 weights, ``torch.autocast`` casting each matmul's inputs to bf16
``int8``           dynamic quantisation of every ``nn.Linear`` (``torch.ao.quantization.quantize_dynamic``:
                   int8 weights, activations quantised per batch; CPU only, VNNI where the CPU has it)
=================  ==========================================================================================

:func:`peak_gflops` times a large matmul in the same precision and the same runtime, so a benchmark can say how close
to the hardware a model runs (GFLOP/s here count a multiply-add as 2 FLOPs, as data sheets do).
"""
from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

def cpu_has_bf16_units() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX tiles, read from ``/proc/cpuinfo``), where
    bf16 autocast speeds a training step up (1.5x for the label-free step on such a CPU, docs/finetuning.md). On other CPUs
    (AVX2 only, say) torch emulates bf16 and the same step ran 12x *slower* (0.73 against 9.3 images/s, DeiT-Tiny
    label-free step, 2-core AMD EPYC). False where the flags cannot be read."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


PRECISIONS = ("fp32", "bf16", "bf16-autocast", "int8")


class PrecisionError(ValueError):
    """A precision this package does not know, or one the device cannot run."""


class _Cast(nn.Module):
    """fp32 in, fp32 out around a model that computes in ``dtype`` (its weights cast) or under autocast."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, autocast: bool) -> None:
        super().__init__()
        self.model, self.dtype, self.autocast = model, dtype, autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # (B, 3, H, W) → (B, classes)
        if self.autocast:
            with torch.autocast(x.device.type, dtype=self.dtype):
                return self.model(x).float()
        return self.model(x.to(self.dtype)).float()


def check_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``precision`` if known and runnable on ``device``.

    Raises:
        PrecisionError: an unknown name (the message lists :data:`PRECISIONS`), or int8 asked of a GPU.
    """
    if precision not in PRECISIONS:
        raise PrecisionError(f"Precision: {str(precision)[:20]!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "int8" and torch.device(device).type != "cpu":
        raise PrecisionError("Precision: int8 (dynamic quantisation) runs on the CPU only")
    return precision


def in_precision(model: nn.Module, precision: str, device: str | torch.device = "cpu") -> nn.Module:
    """A copy of ``model`` (the original is left as it is, except for ``fp32``: the model itself) that runs in
    ``precision`` on ``device``, taking fp32 ``(B, 3, H, W)`` images and returning fp32 ``(B, classes)`` logits.

    Raises:
        PrecisionError: see :func:`check_precision`.

    >>> import cait
    >>> m = cait.create_model(cait.TEST_MODEL, pretrained=False)[0].eval()
    >>> in_precision(m, "bf16")(torch.randn(2, 3, 32, 32)).dtype
    torch.float32
    """
    check_precision(precision, device)
    if precision == "fp32":
        return model.to(device).eval()
    if precision == "int8":
        with warnings.catch_warnings():                      # torch.ao's deprecation notice: still the kept path
            warnings.simplefilter("ignore")
            q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear},
                                                       dtype=torch.qint8)
        return q.eval()
    autocast = precision == "bf16-autocast"
    inner = copy.deepcopy(model).to(device).eval()
    if not autocast:
        inner = inner.to(torch.bfloat16)
    return _Cast(inner, torch.bfloat16, autocast).eval()


def peak_gflops(precision: str, device: str | torch.device = "cpu", n: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s (2 per multiply-add) of an ``n × n`` by ``n × n`` product in ``precision`` on ``device``: the
    device's practical limit for that precision (int8: a dynamically quantised ``nn.Linear`` on ``n`` rows, the
    path :func:`in_precision` uses), the best of ``repeats`` after a warm-up.

    Raises:
        PrecisionError: see :func:`check_precision`.
    """
    check_precision(precision, device)
    dev = torch.device(device)
    layer = in_precision(nn.Linear(n, n, bias=False), precision, dev).to(dev) if precision == "int8" else None
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    a = torch.randn(n, n, device=dev, dtype=torch.float32 if layer is not None else dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            layer(a) if layer is not None else a @ b
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:
                best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9
