"""`python -m groundcam.cli` runs the CLI."""

import sys

from groundcam.cli import main

sys.exit(main())
