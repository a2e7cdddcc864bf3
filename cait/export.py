"""``python -m cait.export``: export a checkpoint to ONNX / TorchScript / torch.export, parity-checked.

The command line lives in :mod:`cait.cli.export`; this module only keeps the README's ``python -m cait.export``.
"""
import sys

from .cli.export import main

if __name__ == "__main__":
    sys.exit(main())
