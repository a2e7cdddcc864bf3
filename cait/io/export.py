"""Export a checkpoint for deployment — ONNX, TorchScript or a ``torch.export`` program — with a parity check.

ATME is static by design: every merge pairs fixed neighbours, so the graph has fixed shapes and plain ops (reshape,
cat, Linear). ToMe's data-dependent ``scatter_reduce`` is what ONNX cannot export; a CAIT model exports like the
DeiT it came from. The batch dimension stays dynamic.

    export_model(model, "onnx", "runs/deit_s_cait/model.onnx")     # or "torchscript", "exported" (torch.export)
    export_model(model, "onnx-int8", "runs/deit_s_cait/model.int8.onnx")   # int8 weights, ONNX Runtime's quantiser

Each export is loaded back and run on a batch of a *different* size than it was traced with; the largest absolute
difference from the PyTorch model is reported and must be within ``--tolerance`` (default 1e-4). ONNX parity uses
ONNX Runtime (optional: ``pip install onnx onnxruntime onnxscript``, the ``export`` extra in ``pyproject.toml``).

``onnx-int8`` is the ONNX export with its MatMul weights quantised to int8 by ONNX Runtime's dynamic quantiser
(activations quantised per batch at run time). Its parity is not bit-close, so it is held to two stated bounds: the
largest logit difference relative to the largest fp32 logit (default :data:`INT8_TOLERANCE`), and the same top-1 as
fp32 PyTorch on every image of the parity batch.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

FORMATS = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "torchscript": "model.torchscript.pt",
           "exported": "model.pt2"}
"""Format → default file name inside the checkpoint directory."""
INT8_TOLERANCE = 0.05
"""``onnx-int8``: the largest absolute logit difference accepted, as a share of the largest absolute fp32 logit."""


class ExportError(RuntimeError):
    """An export that failed or does not match the PyTorch model; the message says which format and why."""


def _example(model: nn.Module, batch: int, seed: int = 0) -> torch.Tensor:
    size = model.patch_embed.img_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g)


def onnx_session(path: str | Path):
    """An ONNX Runtime CPU session for an exported file.

    Raises:
        ExportError: if onnxruntime is not installed.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("ONNX Runtime is not installed: pip install onnxruntime (or the 'export' extra)") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _quantize_onnx(path: Path) -> None:
    """Rewrite the ONNX file at ``path`` with int8 MatMul weights (``onnxruntime.quantization.quantize_dynamic``)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ExportError("ONNX Runtime is not installed: pip install onnxruntime (or the 'export' extra)") from None
    fp32 = path.with_name(path.stem + ".fp32.onnx")
    path.replace(fp32)
    root, level = logging.getLogger(), logging.getLogger().level
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root.setLevel(logging.ERROR)                        # its advice to pre-process goes to the root logger
            quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
        fp32.unlink(missing_ok=True)
        for extra in path.parent.glob(fp32.name + "*"):         # external-data side files, if any
            extra.unlink(missing_ok=True)


def export_model(model: nn.Module, fmt: str, path: str | Path, batch_size: int = 2, tolerance: float | None = None
                 ) -> dict:
    """Export ``model`` to ``path`` in ``fmt`` and check it against PyTorch.

    Args:
        model: a DeiT built by this package (original, ATME or compact); put in eval mode.
        fmt: ``"onnx"``, ``"onnx-int8"``, ``"torchscript"`` or ``"exported"``.
        path: the file to write.
        batch_size: the example batch traced with (the parity batch is one larger, so a static batch would fail).
        tolerance: largest absolute logit difference accepted (default 1e-4); for ``onnx-int8`` a share of the
            largest fp32 logit (default :data:`INT8_TOLERANCE`), and every top-1 must match.

    Returns:
        ``{"format", "path", "bytes", "max_abs_diff", "relative_diff", "top1_agreement", "runtime", "seconds"}``.

    Raises:
        ValueError: for an unknown format.
        ExportError: if exporting fails, the runtime is missing, or parity exceeds ``tolerance``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    model = model.eval().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x, check = _example(model, batch_size), _example(model, batch_size + 1, seed=1)
    batch = torch.export.Dim("batch", min=1, max=4096)
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "torchscript":
                traced = torch.jit.trace(model, x, check_trace=False)
                traced.save(str(path))
                runtime, run = "torch.jit", torch.jit.load(str(path))
            elif fmt == "exported":
                program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
                torch.export.save(program, str(path))
                runtime, run = "torch.export", torch.export.load(str(path)).module()
            else:
                with contextlib.redirect_stdout(io.StringIO()):       # the exporter narrates every stage
                    program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch},),
                                                input_names=["images"], output_names=["logits"])
                program.save(str(path))
                if fmt == "onnx-int8":
                    _quantize_onnx(path)
                session = onnx_session(path)
                runtime = "onnxruntime"

                def run(t: torch.Tensor) -> torch.Tensor:
                    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: t.numpy()})[0])
            expected = model(check)
            got = run(check)
    except ExportError:
        raise
    except Exception as e:  # exporters raise many types; all mean "this format failed for this model"
        raise ExportError(f"{fmt} export failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from e
    return {"format": fmt, "path": str(path), "bytes": path.stat().st_size, **_parity(fmt, got, expected, tolerance),
            "runtime": runtime, "seconds": round(time.perf_counter() - t0, 2)}


def _parity(fmt: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float | None) -> dict:
    """``{"max_abs_diff", "relative_diff", "top1_agreement"}`` of an export's logits against PyTorch's.

    Raises:
        ExportError: past the format's tolerance (see :func:`export_model`).
    """
    diff = float((got.float() - expected.float()).abs().max())
    relative = diff / max(float(expected.abs().max()), 1e-12)
    agree = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    if fmt == "onnx-int8":
        tol = INT8_TOLERANCE if tolerance is None else tolerance
        if not (relative <= tol and agree == 1.0):
            raise ExportError(f"{fmt} export differs from PyTorch by {100 * relative:.1f}% of the largest logit "
                              f"(tolerance {100 * tol:g}%), top-1 agreement {100 * agree:.0f}%")
    else:
        tol = 1e-4 if tolerance is None else tolerance
        if not diff <= tol:
            raise ExportError(f"{fmt} export differs from PyTorch by {diff:.2e} (tolerance {tol:.0e})")
    return {"max_abs_diff": diff, "relative_diff": relative, "top1_agreement": agree}
