"""``python -m rdsd.cli`` runs ``rdsd``."""

import sys

from .rdsd import main

sys.exit(main())
