"""``python -m flowsubmit.cli``."""

import sys

from flowsubmit.cli.commands import main

sys.exit(main())
