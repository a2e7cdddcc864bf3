"""``python -m cait.finetune`` (and ``torchrun -m cait.finetune``): the command line of :mod:`cait.cli.finetune`."""
import sys

from ..cli.finetune import main

sys.exit(main())
