"""``python -m curvkit`` runs the command line."""

import sys

from curvkit.cli import main

sys.exit(main())
