"""``python -m fedmtl.cli ...``: the same as the ``fedmtl`` command."""

import sys

from fedmtl.cli import main

sys.exit(main())
