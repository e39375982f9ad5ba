"""``python -m bayeslora.data fetch`` | ``describe [NAME ...] [--seed S]``."""

from . import main

raise SystemExit(main())
