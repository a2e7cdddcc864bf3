"""``python -m cait.export``: export a checkpoint to ONNX, TorchScript or ``torch.export``, parity-checked.

::

    python -m cait.export runs/deit_s_cait --format onnx            # → runs/deit_s_cait/model.onnx
    python -m cait.export runs/deit_s_cait --format torchscript     # → model.torchscript.pt
    python -m cait.export runs/deit_s_cait --format exported        # → model.pt2 (torch.export)
    python -m cait.export runs/deit_s_cait --format onnx-int8       # → model.int8.onnx (int8 weights)

prints one JSON object with the file and the largest absolute logit difference (:func:`cait.io.export.export_model`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..io.checkpoint import CheckpointError
from ..io.hub import load_pretrained
from ..io.export import FORMATS, ExportError, export_model


def main(argv: list[str] | None = None) -> int:
    """``python -m cait.export``: export, check parity, print JSON. Exit 2 with an ``error:`` line on failure."""
    p = argparse.ArgumentParser(prog="python -m cait.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="a checkpoint directory (cait.save_pretrained / cait.compress / finetune)")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    p.add_argument("--output", default=None, help="file to write (default: inside MODEL_DIR)")
    p.add_argument("--batch-size", type=int, default=2, help="example batch to trace with")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest accepted absolute logit difference (default 1e-4); for onnx-int8 a share of the "
                        "largest logit (default 0.05), with every top-1 matching")
    a = p.parse_args(argv)
    try:
        model = load_pretrained(a.model_dir)
        out = export_model(model, a.format, a.output or Path(a.model_dir) / FORMATS[a.format], a.batch_size,
                           a.tolerance)
    except (CheckpointError, ExportError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0
