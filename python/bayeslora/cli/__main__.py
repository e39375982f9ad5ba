"""``python -m bayeslora.cli ARGS...``: the ``bayeslora`` command."""

import sys

from . import main

sys.exit(main())
