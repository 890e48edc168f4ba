"""``python -m calibrate.io.compare``: see :mod:`calibrate.io.compare`."""

import sys

from calibrate.io.compare.cli import main

if __name__ == "__main__":
    sys.exit(main())
