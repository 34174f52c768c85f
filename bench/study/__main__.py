"""``python -m bench.study``: see :mod:`bench.study`."""

import sys

from .cli import main

sys.exit(main())
