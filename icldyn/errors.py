"""The error every bad input becomes: `ConfigError(field, message)`.

It sits below every other module, so tasks, config, clamps and the command
line raise and catch the same class; the CLI turns it into one line
`icldyn: error: FIELD: message` and exit code 2.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ConfigError(ValueError):
  """A bad configuration value; `field` names the dotted config field (or flag)."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field
    self.message = message


def did_you_mean(name: str, known: Iterable[str]) -> str:
  """'; did you mean X?' naming the closest of `known` to a misspelt `name`, or ''."""
  close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
  return f"; did you mean {close[0]}?" if close else ""
