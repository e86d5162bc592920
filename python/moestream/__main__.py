"""``python -m moestream``: see :mod:`moestream.cli`."""

import sys

from .cli import main

sys.exit(main())
