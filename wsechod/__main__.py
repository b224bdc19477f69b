"""``python -m wsechod``: the same entry point as the console script (which blocks the
signals the command handles before the rest of the package is imported)."""

import sys

from wsechod.process.entry import main

sys.exit(main())
