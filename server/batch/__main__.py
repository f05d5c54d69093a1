"""`python -m server.batch`: see `server.batch.cli`."""

import sys

from server.batch.cli import main

sys.exit(main())
