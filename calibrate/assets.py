"""`python -m calibrate.assets`: the command line of :mod:`calibrate.model.assets` (kept at this name)."""

import sys

from calibrate.model.assets import main

if __name__ == "__main__":
    sys.exit(main())
