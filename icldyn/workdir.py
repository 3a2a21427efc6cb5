"""The workdir's files: config.json, runs.csv, metrics.csv and TensorBoard logs.

Every file that is rewritten is written to a temporary name, fsynced and
renamed, so a crash leaves the old or the new version, never a torn one.
`metrics.csv` is append-only during training; on resume it is rewritten to
the rows at or before the resume step.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Iterable

METRICS_HEADER = ("step", "run", "evaluator", "metric", "value")


def atomic_write(path: str, text: str) -> None:
  """Writes `text` to `path` via a temporary file and rename."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def format_value(v: Any) -> str:
  """A CSV cell: floats with 9 significant digits (exact for float32)."""
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, float):
    return "nan" if math.isnan(v) else f"{v:.9g}"
  if v is None:
    return ""
  return str(v)


def write_runs(path: str, rows: list[dict[str, Any]]) -> None:
  """Writes runs.csv (columns in the order of the first row)."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  cols = list(rows[0].keys())
  w.writerow(cols)
  for r in rows:
    w.writerow([format_value(r[c]) for c in cols])
  atomic_write(path, buf.getvalue())


def read_csv(path: str) -> list[dict[str, str]]:
  """Rows of a CSV file as dicts of strings."""
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def write_json(path: str, obj: Any) -> None:
  atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class MetricsFile:
  """Append-only `metrics.csv` (step,run,evaluator,metric,value)."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.exists(path):
      atomic_write(path, ",".join(METRICS_HEADER) + "\n")

  def truncate_after(self, runs: set[int], step: int) -> None:
    """Drops rows of `runs` with step > `step`, and any torn last line."""
    with open(self.path) as f:
      text = f.read()
    lines = text.split("\n")
    complete = lines[:-1] if not text.endswith("\n") else lines
    keep = [complete[0]]
    for line in complete[1:]:
      parts = line.split(",")
      if len(parts) != len(METRICS_HEADER):
        continue  # torn row
      if int(parts[1]) in runs and int(parts[0]) > step:
        continue
      keep.append(line)
    atomic_write(self.path, "\n".join(keep).rstrip("\n") + "\n")

  def append(self, rows: Iterable[tuple]) -> None:
    """Appends rows and fsyncs (one write call per evaluation)."""
    text = "".join(",".join(format_value(v) for v in r) + "\n" for r in rows)
    with open(self.path, "a") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())


class TensorBoard:
  """One tensorboardX writer per run under `tb/run_{i}`, opened lazily."""

  def __init__(self, root: str):
    self.root = root
    self.writers: dict[int, Any] = {}

  def scalar(self, run: int, tag: str, value: float, step: int) -> None:
    if run not in self.writers:
      from tensorboardX import SummaryWriter
      self.writers[run] = SummaryWriter(os.path.join(self.root, f"run_{run}"))
    if math.isfinite(value):
      self.writers[run].add_scalar(tag, value, step)

  def close(self) -> None:
    for w in self.writers.values():
      w.close()
    self.writers.clear()
