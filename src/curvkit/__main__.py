"""``python -m curvkit`` runs the command line."""

import os
import sys

# python -m puts the working folder first on sys.path, where a torch.py would shadow torch; a
# factory module there is still found (curvkit.config searches the working folder last)
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from curvkit.cli import main  # noqa: E402

sys.exit(main())
