"""``python -m latentmoe ...``: the command line, also what ``torchrun -m latentmoe train ...`` starts on every rank."""

import sys

from latentmoe.cli import main

sys.exit(main())
