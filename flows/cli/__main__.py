"""`python -m flows.cli ...`: the `fewtune` command without the console script."""

import sys

from flows.cli import main

sys.exit(main())
