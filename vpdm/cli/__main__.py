"""``python -m vpdm.cli``: the ``vpdm`` command."""

import sys

from vpdm.cli.commands import main

sys.exit(main())
