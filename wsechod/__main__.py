"""``python -m wsechod``: the same entry point as the console script."""

import sys

from wsechod.cli import main

sys.exit(main())
