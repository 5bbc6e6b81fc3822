"""``python -m protokern ...``: the `protokern` command (`protokern.cli`)."""

import sys

from protokern.cli import main

sys.exit(main())
