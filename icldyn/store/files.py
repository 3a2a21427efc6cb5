"""The workdir's files: their names and columns, declared once; config.json, runs.csv,
metrics.csv and TensorBoard logs written crash-safely.

Every reader and writer of a workdir takes file names and CSV columns from
here (docs/interfaces.md is their user-facing description); the formats are
contracts.

Every file that is rewritten is written to a temporary name, fsynced and
renamed, so a crash leaves the old or the new version, never a torn one.
`metrics.csv` is append-only during training (one fsynced write per
evaluation); on resume, rows past the resume step and a torn last line are
dropped, so no row is duplicated or torn. TensorBoard events past the resume
step are hidden by a purge marker (TensorBoard's own mechanism), and every
writer is flushed before a resume checkpoint, so no event at or before it is lost.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from typing import Any, Iterable, Mapping

from icldyn import faults

# Names inside a workdir.
CONFIG_JSON = "config.json"  # {"config": resolved config, "grid": [axes]}
RUNS_CSV = "runs.csv"
METRICS_CSV = "metrics.csv"
CHECKPOINTS_DIR = "checkpoints"  # checkpoints/g{group}/{stream,resume}/{step}/
TB_DIR = "tb"  # tb/run_{i}/
ANALYSIS_DIR = "analysis"
PROGRESS_CSV = os.path.join(ANALYSIS_DIR, "progress.csv")
PHASE_CHANGES_CSV = os.path.join(ANALYSIS_DIR, "phase_changes.csv")
SUMMARY_CSV = os.path.join(ANALYSIS_DIR, "summary.csv")
ATTENTION_NPZ = os.path.join(ANALYSIS_DIR, "attention_patterns.npz")
PATCHING_CSV = os.path.join(ANALYSIS_DIR, "patching.csv")  # icldyn patch (icldyn.patching)
CIRCUIT_CSV = os.path.join(ANALYSIS_DIR, "circuit.csv")
PATCHING_JSON = os.path.join(ANALYSIS_DIR, "patching.json")  # its settings, each run's circuit
# Curves of phase_changes.csv that `icldyn patch` owns (edge timings): `icldyn
# analyze` keeps them when it rewrites the file.
PATCHING_CURVE_PREFIX = "patching/"
PLOTS_DIR = "plots"
REPORT_MD = "report.md"
LOCK = ".lock"
# What icldyn writes in a workdir (anything else there is the user's).
ENTRIES = (CONFIG_JSON, RUNS_CSV, METRICS_CSV, CHECKPOINTS_DIR, TB_DIR, ANALYSIS_DIR, PLOTS_DIR,
           REPORT_MD, LOCK)

# Columns.
METRICS_HEADER = ("step", "run", "evaluator", "metric", "value")
# runs.csv: these, then every per-run setting, `clamps`, `status`, `diverged_step`.
RUNS_BOOKKEEPING = ("run", "group", "group_index", "status", "diverged_step")
PROGRESS_COLUMNS = ("step", "run", "measure", "layer", "head", "layer2", "head2", "value")
# analysis/patching.csv: one path-patching effect (or an unpatched run's metric) per row.
PATCHING_COLUMNS = ("step", "run", "sender", "receiver", "input", "metric", "value")
# analysis/circuit.csv: circuit scores per checkpoint; `level` edges or heads, `node` the
# edge (`L0H3->L1H5.k`) or head (`L0H3`) of a per-node minimality, else empty.
CIRCUIT_COLUMNS = ("step", "run", "level", "score", "node", "value")
# phase_changes.csv: `run`, every setting of runs.csv, then these.
TIMING_COLUMNS = ("curve", "estimator", "onset", "midpoint", "end", "crossed", "fit_r2")
# summary.csv: the setting columns, then these.
SUMMARY_COLUMNS = ("curve", "estimator", "timing", "n_seeds", "n_crossed", "mean", "std",
                   "ci_low", "ci_high")

# The estimator whose phase-change times every headline shows (the `analyze`
# table's CI and order, report.md, the figures' marks): the threshold
# crossing needs no model of the curve's shape, so it times every curve that
# crosses; the logistic and steepest-slope estimators stay in the tables,
# labelled with their names (docs/interfaces.md).
HEADLINE_ESTIMATOR = "threshold"

TMP_MARK = ".tmp."  # atomic_write's temporary files are `{name}.tmp.{pid}`


def fsync_dir(path: str) -> None:
  """Makes a rename or creation inside `path` durable (no-op where unsupported)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write(path: str, text: str) -> None:
  """Writes `text` to `path` via a temporary file and rename."""
  tmp = f"{path}{TMP_MARK}{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise
  fsync_dir(os.path.dirname(os.path.abspath(path)))


def remove_stale_tmp(directory: str) -> None:
  """Removes temporary files that a killed atomic_write left in `directory`."""
  for name in os.listdir(directory):
    base, mark, pid = name.rpartition(TMP_MARK)
    if mark and base and pid.isdigit():
      os.remove(os.path.join(directory, name))


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

  def truncate_after(self, runs: set[int], step: int) -> int:
    """Drops rows of `runs` with step > `step` (all of them for step < 0) and a torn last line.

    Rewrites the file (atomically) only when something is dropped.

    Returns:
      The number of lines dropped.
    """
    with open(self.path) as f:
      text = f.read()
    lines = text.split("\n")
    complete = lines[:-1]  # the piece after the last newline is empty or torn
    keep = [",".join(METRICS_HEADER)]
    for line in complete[1:]:
      parts = line.split(",")
      try:
        if int(parts[1]) in runs and int(parts[0]) > step:
          continue
      except (IndexError, ValueError):
        continue  # not a row (cannot happen short of outside damage)
      if len(parts) != len(METRICS_HEADER):
        continue
      keep.append(line)
    dropped = max(0, len(complete) - len(keep)) + (1 if lines[-1] else 0)
    if dropped or not complete or complete[0] != keep[0]:
      atomic_write(self.path, "\n".join(keep) + "\n")
    return dropped

  def append(self, rows: Iterable[tuple]) -> None:
    """Appends rows and fsyncs (one write call per evaluation)."""
    text = "".join(",".join(format_value(v) for v in r) + "\n" for r in rows)
    with open(self.path, "a") as f:
      if faults.active("in_metrics"):  # tear this append for the fault-injection tests
        f.write(text[:len(text) // 2])
        f.flush()
        faults.hit("in_metrics")
        text = text[len(text) // 2:]
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    faults.hit("after_metrics")


def _hparam(value: str) -> bool | int | float | str:
  """A runs.csv cell as the typed value TensorBoard's HParams view sorts by."""
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return {"True": True, "False": False}.get(value, value)


def tensorboard_tag(tag: str) -> str:
  """The tag as TensorBoard accepts it: characters outside [A-Za-z0-9_./-]
  become '_' (`fsl_train@keep_head_3/loss` -> `fsl_train_keep_head_3/loss`),
  as tensorboardX would do anyway, with a warning per name."""
  return re.sub(r"[^A-Za-z0-9_./-]", "_", tag)


class TensorBoard:
  """One tensorboardX writer per run under `tb/run_{i}[,name=value...]`, opened lazily.

  TensorBoard shows a run by its directory, so each run's directory names
  the settings the grid varies (`run_3,init=1,num_labels=5`; the last part
  of each dotted name; just `run_{i}` for a grid of one). Each run also
  carries its settings in TensorBoard's hyperparameter view (HParams, with
  the task's headline metric and the training loss as its metrics) and the
  resolved config as text. Both come from the workdir's `runs.csv` and
  `config.json`, which training writes before the first evaluation. A
  workdir written before runs were named keeps its `run_{i}` directories.
  """

  def __init__(self, root: str):
    self.root = root
    self.writers: dict[int, Any] = {}
    self.purge_from: dict[int, int] = {}
    self.opened = 0
    self.described: set[int] = set()
    self.names: dict[int, str] | None = None
    self.resolved: dict[str, Any] | None = None  # config.json, read with the names
    self.settings: dict[int, dict[str, Any]] = {}

  def run_dir(self, run: int) -> str:
    """The directory of a run's events."""
    old = os.path.join(self.root, f"run_{run}")
    if os.path.isdir(old):
      return old
    if self.names is None:
      self.names = self.read_names()
    return os.path.join(self.root, self.names.get(run, f"run_{run}"))

  def read_names(self) -> dict[int, str]:
    """{run: directory name} from runs.csv and config.json's grid axes."""
    workdir = os.path.dirname(os.path.abspath(self.root))
    try:
      rows = read_csv(os.path.join(workdir, RUNS_CSV))
      with open(os.path.join(workdir, CONFIG_JSON)) as f:
        self.resolved = json.load(f)  # read once: `describe` shows it for every run
    except (OSError, ValueError):
      return {}
    axes = self.resolved.get("grid") or []
    fields = [a.split("=", 1)[0] for a in axes]
    fields = [x for f in fields for x in f.split("+")]  # zipped axes
    names = {}
    for row in rows:
      run = int(row["run"])
      self.settings[run] = {k: v for k, v in row.items() if k not in RUNS_BOOKKEEPING}
      parts = [f"{f.rsplit('.', 1)[-1]}={row[f]}" for f in fields if f in row]
      names[run] = ",".join([f"run_{run}"] + [re.sub(r"[^\w.=+-]", "_", p) for p in parts])
    return names

  def describe(self, run: int, writer) -> None:
    """The run's settings as HParams and the resolved config as text (once per run)."""
    from tensorboardX.summary import hparams
    self.described.add(run)
    if self.names is None:
      self.names = self.read_names()
    resolved = self.resolved
    if resolved is None:  # no readable config.json
      return
    settings = {k: _hparam(v) for k, v in self.settings.get(run, {}).items()}
    headline = (resolved.get("task") or {}).get("headline") or "train/loss"
    metrics = {tensorboard_tag(t): math.nan for t in dict.fromkeys([headline, "train/loss"])}
    for summary in hparams(settings, metrics):
      writer.file_writer.add_summary(summary)
    writer.add_text("config", "```\n" + json.dumps(resolved, indent=1) + "\n```", 0)

  def resume(self, runs: Iterable[int], step: int) -> None:
    """Hides, in TensorBoard, the events of `runs` at steps >= `step` left by an earlier process.

    The event files keep them; TensorBoard drops events past a restart
    marker (tensorboardX `purge_step`). Only runs with earlier logs get one.
    """
    for run in runs:
      d = self.run_dir(run)
      if os.path.isdir(d) and os.listdir(d):
        self.purge_from[run] = step
        self.described.add(run)  # described when its first events were written

  def scalars(self, run: int, values: Mapping[str, float], step: int) -> None:
    """Logs `{tag: value}` of one run at one step (non-finite values skipped).

    One event holds all of them (TensorBoard reads each value as its own
    scalar): one event per run per evaluation rather than one per metric,
    which made TensorBoard logging a visible share of an evaluation's time.
    """
    from tensorboardX.proto.summary_pb2 import Summary
    if run not in self.writers:
      from tensorboardX import SummaryWriter
      # A unique suffix per writer: tensorboardX names files by the second and opens them 'wb'.
      self.opened += 1
      self.writers[run] = SummaryWriter(self.run_dir(run),
                                        purge_step=self.purge_from.get(run),
                                        filename_suffix=f".{os.getpid()}.{self.opened:06d}")
      if run not in self.described:
        self.describe(run, self.writers[run])
    summary = Summary(value=[Summary.Value(tag=tensorboard_tag(tag), simple_value=v)
                             for tag, v in values.items() if math.isfinite(v)])
    if summary.value:
      self.writers[run].file_writer.add_summary(summary, step)

  def flush(self) -> None:
    """Writes every queued event to disk (tensorboardX's own flush skips its queue).

    Closes the writers; the next scalar opens a new event file.
    """
    self.close()
    self.purge_from.clear()

  def close(self) -> None:
    for w in self.writers.values():
      w.close()
    self.writers.clear()
