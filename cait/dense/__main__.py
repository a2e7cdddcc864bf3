"""``python -m cait.dense`` (and ``torchrun -m cait.dense``): the command line of :mod:`cait.cli.dense`."""
import sys

from ..cli.dense import main

sys.exit(main())
