"""`python -m tasks.train`: the stage alone (see `tasks.train.main`)."""

import sys

from tasks.train import main

sys.exit(main())
