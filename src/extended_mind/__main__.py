"""`python -m extended_mind` runs the command line."""

import sys

from .cli import main

sys.exit(main())
