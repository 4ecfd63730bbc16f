"""``python -m lrqat_kernels ...`` runs the ``lrqat`` command (see ``cli.py``)."""

import sys

from .cli import main

sys.exit(main())
