"""``python -m vpdm.bench``."""

import sys

from vpdm.bench.cli import main

sys.exit(main())
