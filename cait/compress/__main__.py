"""``python -m cait.compress``: see :func:`cait.compress.main`."""
import sys

from . import main

sys.exit(main())
