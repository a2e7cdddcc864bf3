"""``python -m cait.finetune``: CDCP fine-tuning from the command line, one flag per :class:`FinetuneConfig` field.

::

    python -m cait.finetune --model deit_test_patch4_32 --data synthetic --steps 300 --output runs/demo
    torchrun --standalone --nproc_per_node=2 -m cait.finetune ... --device cpu       # DDP
    python -m cait.finetune ... --resume                                              # continue a killed run

prints the final record (:class:`cait.finetune.records.FinalRecord`, without the mask) as JSON on rank 0; bad input
exits 2 with one ``error:`` line.
"""
from __future__ import annotations

import json
import os
import sys

from ..finetune.config import FinetuneConfig, FinetuneError
from ..finetune.engine import finetune
from ..finetune.records import to_dict
from .flags import dataclass_parser


def main(argv: list[str] | None = None) -> int:
    """Command line: run, print the final summary as JSON (rank 0); exit 2 with a message on bad input."""
    args = dataclass_parser(FinetuneConfig, "python -m cait.finetune",
                            "CDCP fine-tuning with hard distillation (docs/method.md: CDCP, fine-tuning)"
                            ).parse_args(argv)
    cfg = FinetuneConfig(**vars(args))
    try:
        result = finetune(cfg)
    except (FinetuneError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(to_dict(result)))
    return 0
