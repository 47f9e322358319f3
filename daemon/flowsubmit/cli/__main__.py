"""``python -m flowsubmit.cli``."""

import sys

from flowsubmit.cli.parser import main

sys.exit(main())
