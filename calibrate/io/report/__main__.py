"""``python -m calibrate.io.report``: see :mod:`calibrate.io.report`."""

import sys

from calibrate.io.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
