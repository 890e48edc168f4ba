"""``python -m calibrate <command> ...``: the ``calibrate`` command (:mod:`calibrate.cli`)."""

import sys

from calibrate.cli import main

sys.exit(main())
