"""``python -m cait.dense``: train a segmenter on any backbone of this package, one flag per
:class:`cait.dense.train.SegmentConfig` field.

::

    python -m cait.dense --backbone bundled:cait --steps 300 --output runs/seg_cait            # a probe (frozen)
    python -m cait.dense --backbone bundled:original --baseline tome --flops-reduction 0.5 ...   # ToMe, undone
    python -m cait.dense --backbone bundled:cait --backbone-lr 6e-5 ...                          # end to end
    torchrun --standalone --nproc_per_node=2 -m cait.dense ... --device cpu
    python -m cait.dense ... --resume                                                            # after a kill

prints the held-out score as JSON on rank 0 (``miou``, ``per_class_iou``, ``pixel_accuracy``, ``step``,
``output``); bad input exits 2 with one ``error:`` line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from ..data.datasets import DataError
from ..dense.train import SegmentConfig, segment
from ..finetune.config import FinetuneError
from .flags import dataclass_parser


def main(argv: list[str] | None = None) -> int:
    """Run, print the score as JSON (rank 0); exit 2 with a message on bad input."""
    args = dataclass_parser(SegmentConfig, "python -m cait.dense",
                            "Train a segmenter (Semantic FPN) on a CAIT, original or baseline "
                            "backbone").parse_args(argv)
    try:
        result = segment(SegmentConfig(**vars(args)))
    except (FinetuneError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        score = dataclasses.asdict(result.score) if result.score else None
        print(json.dumps({"step": result.step, "output": str(result.output), "score": score}))
    return 0
