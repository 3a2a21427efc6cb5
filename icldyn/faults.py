"""Fault injection for the reliability tests: `ICLDYN_FAULT=POINT:N[:SIGNAL]`.

With the variable set, the N-th time (1-based, counted per process) the
process reaches POINT it sends itself SIGNAL (`KILL` by default; `TERM`,
`INT`), so tests can kill a run at reproducible instants. Unset, every hook
is a dictionary lookup. Points:

  after_chunk       a compiled chunk of steps has been sent to the devices (before
                    its events are written and before the next chunk is sent)
  in_metrics        half of one evaluation's rows are in metrics.csv (a torn append)
  after_metrics     one evaluation's rows are appended and fsynced
  in_checkpoint     a checkpoint (stream or resume) is fully written to orbax's
                    temporary directory, not yet renamed into place
  before_manifest   a checkpoint is renamed into place, its manifest not yet written
  after_checkpoint  a checkpoint save has completed (manifest written)

Example: `ICLDYN_FAULT=in_checkpoint:2 icldyn train ...` dies inside the
second checkpoint save.
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_chunk", "in_metrics", "after_metrics", "in_checkpoint", "before_manifest",
          "after_checkpoint")
_counts: dict[str, int] = {}


def _spec() -> tuple[str, int, int] | None:
  text = os.environ.get("ICLDYN_FAULT", "")
  if not text:
    return None
  parts = text.split(":")
  try:
    point, n = parts[0], int(parts[1])
    sig = getattr(signal, "SIG" + (parts[2] if len(parts) > 2 else "KILL").upper())
  except (IndexError, ValueError, AttributeError):
    raise ValueError(f"ICLDYN_FAULT={text!r}: expected POINT:N[:SIGNAL]") from None
  if point not in POINTS or len(parts) > 3:
    raise ValueError(f"ICLDYN_FAULT={text!r}: POINT must be one of {', '.join(POINTS)}")
  return point, n, sig


def active(point: str) -> bool:
  """Whether ICLDYN_FAULT names `point` (so a hook may prepare, e.g. tear a write)."""
  spec = _spec()
  return spec is not None and spec[0] == point


def hit(point: str) -> None:
  """Counts a visit to `point`; on the N-th visit named by ICLDYN_FAULT, signals this process."""
  spec = _spec()
  if spec is None or spec[0] != point:
    return
  _counts[point] = _counts.get(point, 0) + 1
  if _counts[point] == spec[1]:
    os.kill(os.getpid(), spec[2])
