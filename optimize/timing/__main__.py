"""`python -m optimize.timing worker ENGINE --shape BxS ...`: a timing worker (see `worker`)."""

import sys

from optimize.timing.worker import main

sys.exit(main())
