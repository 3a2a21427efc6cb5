"""`python -m icldyn ...` is the `icldyn` command."""

import sys

from icldyn.cli import main

sys.exit(main())
