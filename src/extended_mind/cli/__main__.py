import sys

from extended_mind.cli.launch import main

sys.exit(main())
