"""``python -m samkit ...`` runs the ``samkit`` console script."""

import sys

from .commands.main import main

sys.exit(main())
