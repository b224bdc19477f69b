"""``python -m wsechod``: the same entry point as the console script."""

import sys

from wsechod.process.cli import main

sys.exit(main())
