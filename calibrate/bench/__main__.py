"""`python -m calibrate.bench`: the probe benchmark (:mod:`calibrate.bench.probe`);
`python -m calibrate.bench prefix ...`: shared-prefix reuse (:mod:`calibrate.bench.prefix`)."""

import sys

if sys.argv[1:2] == ["prefix"]:
    from calibrate.bench.prefix import main

    main(sys.argv[2:])
    sys.exit(0)

from calibrate.bench.probe import main  # noqa: E402

sys.exit(main())
