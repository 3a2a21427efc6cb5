"""Reading a workdir's CSV results into numpy columns, without JAX.

This module owns the host-side view of a finished (or running) workdir: it
reads `config.json`, `runs.csv`, `metrics.csv` and the `analysis/` CSVs whose
formats are fixed in `docs/interfaces.md`, and offers the few queries that the
plots and the report share (which settings vary, which runs differ only by
seed, one time series per run). Every file is optional, so a workdir that is
still training, or that was never analysed, loads as far as it goes.

It deliberately imports only the standard library and numpy: plotting and
reporting run on machines (laptops, CI) where JAX is absent or slow to import.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from icldyn.store import files

# runs.csv columns that describe the run's bookkeeping rather than a setting.
RUN_META_COLUMNS = files.RUNS_BOOKKEEPING
# Settings that only change random draws: runs that differ in these alone are
# replicates of one setting and are averaged together.
SEED_COLUMNS = ('seeds.init', 'seeds.data', 'seeds.eval')
PHASE_COLUMNS = files.TIMING_COLUMNS
SUMMARY_COLUMNS = files.SUMMARY_COLUMNS

_TRUE_STRINGS = frozenset({'true', '1', 'yes', 't', 'y'})
_BOOL_STRINGS = frozenset({'true', 'false'})


@dataclasses.dataclass(frozen=True)
class Table:
  """A CSV file held column by column.

  Numeric columns are float64 (empty cells become nan) or int64 when every
  cell is an integer; `True`/`False` columns are bool; everything else is a
  numpy string array. Columns keep the file's order.

  Attributes:
    columns: column name -> array `[n_rows]`.
  """

  columns: Mapping[str, np.ndarray]

  def __len__(self) -> int:
    for values in self.columns.values():
      return len(values)
    return 0

  def __contains__(self, name: object) -> bool:
    return name in self.columns

  def __getitem__(self, name: str) -> np.ndarray:
    return self.columns[name]

  @property
  def names(self) -> list[str]:
    return list(self.columns)

  def mask(self, conditions: Mapping[str, Any]) -> np.ndarray:
    """Rows where every named column equals the given value.

    Args:
      conditions: column name -> value. A column that is absent matches
        nothing.

    Returns:
      Boolean array `[n_rows]`.
    """
    keep = np.ones(len(self), dtype=bool)
    for name, value in conditions.items():
      if name not in self.columns:
        return np.zeros(len(self), dtype=bool)
      keep &= _equal(self.columns[name], value)
    return keep

  def take(self, rows: np.ndarray) -> Table:
    """The sub-table at a boolean mask or an index array."""
    return Table({k: v[rows] for k, v in self.columns.items()})

  def select(self, conditions: Mapping[str, Any]) -> Table:
    """The rows matching `conditions` (see `mask`)."""
    return self.take(self.mask(conditions))

  def rows(self) -> list[dict[str, Any]]:
    """The table as a list of dicts of Python scalars."""
    names = self.names
    cols = [self.columns[n].tolist() for n in names]
    return [dict(zip(names, values)) for values in zip(*cols)]

  def unique(self, name: str) -> list[Any]:
    """Distinct values of a column in order of first appearance."""
    if name not in self.columns:
      return []
    seen: dict[Any, None] = {}
    for value in self.columns[name].tolist():
      key = value_key(value)
      if key not in seen:
        seen[key] = None
    return list(seen)


# One shared nan object: dict lookups compare identity before equality, so
# every empty cell maps to this single key even though nan != nan.
_NAN = float('nan')


def value_key(value: Any) -> Any:
  """A dict key for a cell value under which all nans coincide."""
  if isinstance(value, float) and math.isnan(value):
    return _NAN
  return value


def _equal(column: np.ndarray, value: Any) -> np.ndarray:
  if column.dtype.kind == 'b' and isinstance(value, str):
    return column == (value.strip().lower() in _TRUE_STRINGS)
  if column.dtype.kind in 'fiu' and isinstance(value, str):
    try:
      value = float(value)
    except ValueError:
      return np.zeros(len(column), dtype=bool)
  if column.dtype.kind == 'U' and not isinstance(value, str):
    value = str(value)
  if isinstance(value, float) and math.isnan(value):
    return np.isnan(column) if column.dtype.kind == 'f' else np.zeros(
        len(column), dtype=bool)
  return np.asarray(column == value, dtype=bool)


def _convert(values: list[str]) -> np.ndarray:
  """Types one CSV column: int, float, bool or string, in that preference."""
  stripped = [v.strip() for v in values]
  try:
    floats = np.array([v if v else 'nan' for v in stripped], dtype=np.float64)
  except ValueError:
    lowered = {v.lower() for v in stripped}
    if lowered and lowered <= _BOOL_STRINGS:
      return np.array([v.lower() == 'true' for v in stripped], dtype=bool)
    return np.array(stripped, dtype=str)
  # Only cells written as integers make an int column: '1.0' stays float.
  integral = (bool(np.isfinite(floats).all())
              and bool(np.all(floats == np.round(floats)))
              and all('.' not in v and 'e' not in v.lower() for v in stripped))
  if integral and floats.size and np.abs(floats).max() < 2**62:
    return floats.astype(np.int64)
  return floats


def read_table(path: str | pathlib.Path) -> Table | None:
  """Reads a headed CSV file into a `Table`.

  Args:
    path: the CSV file.

  Returns:
    The table (possibly with zero rows), or None if the file does not exist
    or has no header.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return None
  with path.open(newline='') as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if not header:
      return None
    cells: list[list[str]] = [[] for _ in header]
    for row in reader:
      if not row:
        continue
      # A row cut short (a file still being written) is padded, not dropped,
      # only if it has at least its first column.
      for i, col in enumerate(cells):
        col.append(row[i] if i < len(row) else '')
  return Table({name: _convert(col) for name, col in zip(header, cells)})


def to_int(value: Any, default: int) -> int:
  """`int(value)`, or `default` for a missing cell (None, nan, '')."""
  try:
    return int(value)
  except (TypeError, ValueError):
    return default


def as_bool(column: np.ndarray) -> np.ndarray:
  """Interprets a `crossed`-style column (bool, 0/1 or strings) as bool.

  Args:
    column: array `[n]` of any dtype produced by `read_table`.

  Returns:
    Boolean array `[n]`; nan and unknown strings are False.
  """
  if column.dtype.kind == 'b':
    return column
  if column.dtype.kind in 'fiu':
    return np.nan_to_num(column.astype(np.float64), nan=0.0) != 0
  return np.array([str(v).strip().lower() in _TRUE_STRINGS for v in column],
                  dtype=bool)


@dataclasses.dataclass
class WorkdirData:
  """Everything the plots and the report read from one workdir.

  Any field is None when its file is missing.

  Attributes:
    path: the workdir.
    config: the parsed `config.json`.
    runs: `runs.csv`, one row per run.
    metrics: `metrics.csv` (step, run, evaluator, metric, value).
    progress: `analysis/progress.csv`.
    phase_changes: `analysis/phase_changes.csv`.
    summary: `analysis/summary.csv`.
  """

  path: pathlib.Path
  config: dict[str, Any] | None = None
  runs: Table | None = None
  metrics: Table | None = None
  progress: Table | None = None
  phase_changes: Table | None = None
  summary: Table | None = None

  @property
  def task(self) -> dict[str, Any]:
    """The task's facts of config.json (`icldyn.tasks.base.Task.facts`): name,
    headline, evaluators, induction_metric, data_axes, references.

    A workdir written before they were recorded gives what its tables tell:
    the headline is the first timed curve (else the first evaluator's loss),
    the induction metric the per-head metric that is not `prev_token`, the
    data axes every numeric per-run setting but seeds, optimizer and clamp
    settings, and no reference lines.
    """
    facts = dict((self.config or {}).get('task') or {})
    metrics = self.metrics if self.metrics is not None and 'metric' in self.metrics else None
    if 'headline' not in facts:
      curves = (list(self.phase_changes.unique('curve'))
                if self.phase_changes is not None and 'curve' in self.phase_changes else [])
      evals = [e for e in (metrics.unique('evaluator') if metrics is not None else [])
               if e != 'train']
      facts['headline'] = curves[0] if curves else (f'{evals[0]}/loss' if evals else '')
    if 'induction_metric' not in facts:
      heads = {str(m).rsplit('.h', 1)[0] for m in (metrics.unique('metric') if metrics is not None
                                                  else []) if re.fullmatch(r'.+\.h\d+', str(m))}
      heads.discard('prev_token')
      facts['induction_metric'] = sorted(heads)[0] if heads else 'induction_strength'
    if 'data_axes' not in facts:
      skip = SEED_COLUMNS + ('clamps',)
      facts['data_axes'] = [n for n in self.setting_names() if n not in skip
                            and not n.startswith(('train.', 'clamp.'))]
    facts.setdefault('evaluators', [])
    facts.setdefault('references', {})
    return facts

  def setting_names(self) -> list[str]:
    """Per-run setting columns of runs.csv (dotted names), in file order."""
    if self.runs is None:
      return []
    return [n for n in self.runs.names if n not in RUN_META_COLUMNS]

  def varying_settings(self, include_seeds: bool = False) -> list[str]:
    """Settings that take more than one value across the runs.

    Args:
      include_seeds: whether to count the seed columns.

    Returns:
      Dotted setting names in runs.csv order.
    """
    if self.runs is None:
      return []
    names = [n for n in self.setting_names()
             if include_seeds or n not in SEED_COLUMNS]
    return [n for n in names if len(self.runs.unique(n)) > 1]

  def run_ids(self) -> list[int]:
    """Run indices from runs.csv, else those seen in metrics.csv."""
    for table in (self.runs, self.metrics, self.phase_changes, self.progress):
      if table is not None and 'run' in table:
        return sorted(int(r) for r in table.unique('run'))
    return []

  def run_settings(self, run: int) -> dict[str, Any]:
    """The settings of one run (empty if runs.csv is missing)."""
    if self.runs is None or 'run' not in self.runs:
      return {}
    rows = self.runs.select({'run': run}).rows()
    if not rows:
      return {}
    return {k: v for k, v in rows[0].items() if k not in RUN_META_COLUMNS}

  def setting_groups(self, runs: Iterable[int] | None = None
                     ) -> list[tuple[dict[str, Any], list[int]]]:
    """Groups runs that differ only by seed.

    Args:
      runs: the run indices to group; all runs by default.

    Returns:
      `(settings, run_ids)` pairs in order of first run, where `settings`
      maps each varying non-seed setting to the group's value (empty when
      only seeds vary). Without runs.csv every run is its own group.
    """
    run_list = list(self.run_ids() if runs is None else runs)
    varying = self.varying_settings()
    if self.runs is None:
      return [({}, [r]) for r in run_list]
    groups: dict[tuple[Any, ...], tuple[dict[str, Any], list[int]]] = {}
    for r in run_list:
      settings = self.run_settings(r)
      key_values = {k: settings.get(k) for k in varying}
      key = tuple(value_key(v) for v in key_values.values())
      groups.setdefault(key, (key_values, []))[1].append(r)
    return list(groups.values())


def load_workdir(workdir: str | pathlib.Path) -> WorkdirData:
  """Reads every results file a workdir has.

  Args:
    workdir: the workdir `DIR` (see docs/interfaces.md).

  Returns:
    A `WorkdirData`; missing files leave their field None.
  """
  path = pathlib.Path(workdir)
  config = None
  config_path = path / files.CONFIG_JSON
  if config_path.is_file():
    try:
      config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
      logging.warning('Ignoring unreadable %s: %s', config_path, e)
  return WorkdirData(
      path=path,
      config=config,
      runs=read_table(path / files.RUNS_CSV),
      metrics=read_table(path / files.METRICS_CSV),
      progress=read_table(path / files.PROGRESS_CSV),
      phase_changes=read_table(path / files.PHASE_CHANGES_CSV),
      summary=read_table(path / files.SUMMARY_CSV),
  )


def series_by_run(table: Table, conditions: Mapping[str, Any],
                  runs: Sequence[int] | None = None
                  ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """One `(step, value)` series per run from a long-format table.

  Args:
    table: a table with `step`, `run` and `value` columns (metrics.csv or
      progress.csv).
    conditions: equality filters, e.g. `{'evaluator': 'fsl_train',
      'metric': 'loss'}`.
    runs: keep only these runs; all by default.

  Returns:
    run -> `(steps [n], values [n])`, sorted by step. Repeated steps (a run
    resumed from a checkpoint re-logs them) keep the last value written.
  """
  sub = table.select(conditions)
  if not len(sub):
    return {}
  run_col = sub['run'].astype(np.int64)
  step_col = sub['step'].astype(np.float64)
  value_col = sub['value'].astype(np.float64)
  wanted = None if runs is None else set(int(r) for r in runs)
  out = {}
  for r in np.unique(run_col):
    if wanted is not None and int(r) not in wanted:
      continue
    idx = np.nonzero(run_col == r)[0]
    steps, values = step_col[idx], value_col[idx]
    # Reverse before unique so that the last write of a step wins.
    uniq, first = np.unique(steps[::-1], return_index=True)
    out[int(r)] = (uniq, values[::-1][first])
  return out


def stack_series(series: Sequence[tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Aligns several runs' series on the union of their steps.

  Args:
    series: `(steps [n_i], values [n_i])` per run.

  Returns:
    `(steps [n], values [n_runs, n])` with nan where a run has no value.
  """
  if not series:
    return np.zeros(0), np.zeros((0, 0))
  steps = np.unique(np.concatenate([s for s, _ in series]))
  out = np.full((len(series), len(steps)), np.nan)
  for i, (s, v) in enumerate(series):
    out[i, np.searchsorted(steps, s)] = v
  return steps, out
