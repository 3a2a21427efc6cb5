"""Reading a workdir's CSV results into pandas DataFrames, without JAX.

This module owns the host-side view of a finished (or running) workdir: it
reads `config.json`, `runs.csv`, `metrics.csv` and the `analysis/` CSVs whose
formats are fixed in `docs/interfaces.md`, and offers the few queries that the
plots and the report share (which settings vary, which runs differ only by
seed, one time series per run). Every file is optional, so a workdir that is
still training, or that was never analysed, loads as far as it goes.

It imports only the standard library, numpy and pandas: plotting and
reporting run on machines (laptops, CI) where JAX is absent or slow to import.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from icldyn.store import files

# runs.csv columns that describe the run's bookkeeping rather than a setting.
RUN_META_COLUMNS = files.RUNS_BOOKKEEPING
# Settings that only change random draws: runs that differ in these alone are
# replicates of one setting and are averaged together.
SEED_COLUMNS = ('seeds.init', 'seeds.data', 'seeds.eval')
PHASE_COLUMNS = files.TIMING_COLUMNS
SUMMARY_COLUMNS = files.SUMMARY_COLUMNS

_TRUE_STRINGS = frozenset({'true', '1', 'yes', 't', 'y'})


def read_table(path: str | pathlib.Path) -> pd.DataFrame | None:
  """Reads a headed CSV file of a workdir into a DataFrame.

  Columns are typed by pandas (int64 when every cell is an integer, float64
  with nan for empty cells, bool for True/False, else strings). Only empty
  cells are missing values: a setting spelled `none` or `NA` stays a
  string. Floats are parsed exactly (`float_precision='round_trip'`), so a
  value read back equals the one written. A last line cut short by a run
  still writing is padded with nan; a malformed line is skipped.

  Args:
    path: the CSV file.

  Returns:
    The table (possibly with zero rows), or None if the file does not exist
    or has no header.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return None
  try:
    return pd.read_csv(path, keep_default_na=False, na_values=[''],
                       float_precision='round_trip', on_bad_lines='skip')
  except pd.errors.EmptyDataError:
    return None


def select(table: pd.DataFrame, conditions: Mapping[str, Any]) -> pd.DataFrame:
  """The rows where every named column equals the given value (nan matches nan;
  a column that is absent matches nothing)."""
  keep = pd.Series(True, index=table.index)
  for name, value in conditions.items():
    if name not in table:
      return table.iloc[:0]
    column = table[name]
    if isinstance(value, float) and math.isnan(value):
      keep &= column.isna()
    elif column.dtype == object and not isinstance(value, str):
      keep &= column == str(value)
    else:
      keep &= column == value
  return table[keep]


def unique(table: pd.DataFrame | None, name: str) -> list[Any]:
  """Distinct values of a column in order of first appearance (Python scalars;
  one nan for every empty cell)."""
  if table is None or name not in table:
    return []
  return table[name].drop_duplicates().tolist()


def rows(table: pd.DataFrame) -> list[dict[str, Any]]:
  """The table as a list of dicts of Python scalars."""
  names = list(table.columns)
  return [dict(zip(names, values)) for values in zip(*(table[n].tolist() for n in names))]


# One shared nan object: dict lookups compare identity before equality, so
# every empty cell maps to this single key even though nan != nan.
_NAN = float('nan')


def value_key(value: Any) -> Any:
  """A dict key for a cell value under which all nans coincide."""
  if isinstance(value, float) and math.isnan(value):
    return _NAN
  return value


def to_int(value: Any, default: int) -> int:
  """`int(value)`, or `default` for a missing cell (None, nan, '')."""
  try:
    return int(value)
  except (TypeError, ValueError):
    return default


def as_bool(column: pd.Series | np.ndarray) -> np.ndarray:
  """Interprets a `crossed`-style column (bool, 0/1 or strings) as bool.

  Returns:
    Boolean array `[n]`; nan and unknown strings are False.
  """
  values = np.asarray(column)
  if values.dtype.kind == 'b':
    return values
  if values.dtype.kind in 'fiu':
    return np.nan_to_num(values.astype(np.float64), nan=0.0) != 0
  return np.array([str(v).strip().lower() in _TRUE_STRINGS for v in values], dtype=bool)


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
  runs: pd.DataFrame | None = None
  metrics: pd.DataFrame | None = None
  progress: pd.DataFrame | None = None
  phase_changes: pd.DataFrame | None = None
  summary: pd.DataFrame | None = None

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
      curves = unique(self.phase_changes, 'curve')
      evals = [e for e in unique(metrics, 'evaluator') if e != 'train']
      facts['headline'] = curves[0] if curves else (f'{evals[0]}/loss' if evals else '')
    if 'induction_metric' not in facts:
      heads = {str(m).rsplit('.h', 1)[0] for m in unique(metrics, 'metric')
               if re.fullmatch(r'.+\.h\d+', str(m))}
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
    return [n for n in self.runs.columns if n not in RUN_META_COLUMNS]

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
    return [n for n in names if len(unique(self.runs, n)) > 1]

  def run_ids(self) -> list[int]:
    """Run indices from runs.csv, else those seen in metrics.csv."""
    for table in (self.runs, self.metrics, self.phase_changes, self.progress):
      if table is not None and 'run' in table:
        return sorted(int(r) for r in unique(table, 'run'))
    return []

  def run_settings(self, run: int) -> dict[str, Any]:
    """The settings of one run (empty if runs.csv is missing)."""
    if self.runs is None or 'run' not in self.runs:
      return {}
    found = rows(select(self.runs, {'run': run}))
    if not found:
      return {}
    return {k: v for k, v in found[0].items() if k not in RUN_META_COLUMNS}

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


def series_by_run(table: pd.DataFrame, conditions: Mapping[str, Any],
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
  sub = select(table, conditions)
  if runs is not None:
    sub = sub[sub['run'].isin([int(r) for r in runs])]
  sub = sub.drop_duplicates(['run', 'step'], keep='last').sort_values(['run', 'step'])
  return {int(r): (g['step'].to_numpy(np.float64), g['value'].to_numpy(np.float64))
          for r, g in sub.groupby('run', sort=True)}


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
