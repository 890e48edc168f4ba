"""`python -m calibrate.bench_nullspace`: the command line of :mod:`calibrate.bench.nullspace` (kept at this name)."""

import sys

from calibrate.bench.nullspace import main

if __name__ == "__main__":
    sys.exit(main())
