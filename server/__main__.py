"""``python -m mmsim.server``: the ``mmsim`` command."""

import sys

from .cli import main

sys.exit(main())
