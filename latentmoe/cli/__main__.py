"""``python -m latentmoe.cli ...``: the command line."""

import sys

from latentmoe.cli import main

sys.exit(main())
