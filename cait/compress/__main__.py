"""``python -m cait.compress``: the command line of :mod:`cait.cli.compress`."""
import sys

from ..cli.compress import main

sys.exit(main())
