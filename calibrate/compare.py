"""`python -m calibrate.compare`: the command line of :mod:`calibrate.io.compare` (kept at this name)."""

import sys

from calibrate.io.compare import main

if __name__ == "__main__":
    sys.exit(main())
