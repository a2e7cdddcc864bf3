"""Export a checkpoint for deployment — ONNX, TorchScript or a ``torch.export`` program — with a parity check.

ATME is static by design: every merge pairs fixed neighbours, so the graph has fixed shapes and plain ops (reshape,
cat, Linear). ToMe's data-dependent ``scatter_reduce`` is what ONNX cannot export; a CAIT model exports like the
DeiT it came from. The batch dimension stays dynamic.

    export_model(model, "onnx", "runs/deit_s_cait/model.onnx")     # or "torchscript", "exported" (torch.export)

Each export is loaded back and run on a batch of a *different* size than it was traced with; the largest absolute
difference from the PyTorch model is reported and must be within ``--tolerance`` (default 1e-4). ONNX parity uses
ONNX Runtime (optional: ``pip install onnx onnxruntime onnxscript``, the ``export`` extra in ``pyproject.toml``).
"""
from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported": "model.pt2"}
"""Format → default file name inside the checkpoint directory."""


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


def export_model(model: nn.Module, fmt: str, path: str | Path, batch_size: int = 2, tolerance: float = 1e-4
                 ) -> dict:
    """Export ``model`` to ``path`` in ``fmt`` and check it against PyTorch.

    Args:
        model: a DeiT built by this package (original, ATME or compact); put in eval mode.
        fmt: ``"onnx"``, ``"torchscript"`` or ``"exported"``.
        path: the file to write.
        batch_size: the example batch traced with (the parity batch is one larger, so a static batch would fail).
        tolerance: largest absolute logit difference accepted.

    Returns:
        ``{"format", "path", "bytes", "max_abs_diff", "runtime", "seconds"}``.

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
    diff = float((got.float() - expected.float()).abs().max())
    if not diff <= tolerance:
        raise ExportError(f"{fmt} export differs from PyTorch by {diff:.2e} (tolerance {tolerance:.0e})")
    return {"format": fmt, "path": str(path), "bytes": path.stat().st_size, "max_abs_diff": diff,
            "runtime": runtime, "seconds": round(time.perf_counter() - t0, 2)}
