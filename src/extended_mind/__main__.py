"""`python -m extended_mind` runs the command line."""

import sys

from extended_mind.cli import main

sys.exit(main())
