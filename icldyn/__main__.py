"""`python -m icldyn ...` is the `icldyn` command."""

from icldyn.cli import entry

entry()
