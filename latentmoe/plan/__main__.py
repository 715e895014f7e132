"""``python -m latentmoe.plan ...``: the ``plan`` command without the rest of the latentmoe CLI."""

import sys

from latentmoe.cli.plan import main

sys.exit(main())
