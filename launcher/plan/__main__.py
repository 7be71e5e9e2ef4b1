"""`python -m launcher.plan`: the dry run (launcher/plan/cli.py)."""

import sys

from launcher.plan.cli import main

sys.exit(main())
