"""`python -m tasks.health`: the stage alone (see `tasks.health.main`)."""

import sys

from tasks.health import main

sys.exit(main())
