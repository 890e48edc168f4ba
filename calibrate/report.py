"""`python -m calibrate.report`: the command line of :mod:`calibrate.io.report` (kept at this name)."""

import sys

from calibrate.io.report import main

if __name__ == "__main__":
    sys.exit(main())
