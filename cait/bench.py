"""``python -m cait.bench``: a DeiT against its CAIT twin: FLOPs, parameters, measured throughput.

The command line lives in :mod:`cait.cli.bench`; this module only keeps the README's ``python -m cait.bench``.
"""
import sys

from .cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
