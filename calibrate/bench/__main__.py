"""`python -m calibrate.bench`: the probe benchmark (:mod:`calibrate.bench.probe`)."""

import sys

from calibrate.bench.probe import main

sys.exit(main())
