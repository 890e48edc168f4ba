"""`python -m calibrate.bench_cloze`: the command line of :mod:`calibrate.bench.cloze` (kept at this name)."""

import sys

from calibrate.bench.cloze import main

if __name__ == "__main__":
    sys.exit(main())
