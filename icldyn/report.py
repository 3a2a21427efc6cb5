"""A markdown report of a workdir: phase-change times and the figures.

This module owns `DIR/report.md`. It reads the same tables as the plots
(through `icldyn.results`), tabulates when each run or setting crossed the
loss threshold, and embeds whatever figures `icldyn.plots.make_all` left in
`DIR/plots/`, by paths relative to the report so the workdir can be moved or
rendered by any markdown viewer. Like the plots, it never imports JAX.
"""

from __future__ import annotations

import collections
import importlib.metadata
import logging
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from icldyn import results
from icldyn.store import files

logger = logging.getLogger(__name__)

REPORT_NAME = files.REPORT_MD
# Known figures in reading order, with the caption each gets in the report.
CAPTIONS = {
    'phase_curves': 'Loss and accuracy per evaluator; dashed vertical lines '
                    'mark detected phase changes, horizontal lines the '
                    "task's reference levels (legend).",
    'progress_heads': 'Induction score of last-layer heads and '
                      'previous-token score of first-layer heads.',
    'timing_vs_data': 'Phase-change time against the swept data properties '
                      '(error bars over seeds; open markers never crossed).',
    'composition': 'Composition scores between earlier and later heads.',
    'attention_patterns': 'Attention patterns at checkpoints across training.',
}
NOT_CROSSED = 'not crossed'


def _cell(value: Any) -> str:
  if isinstance(value, float):
    if math.isnan(value):
      return '–'
    return f'{value:g}'
  # A pipe would end the markdown cell early.
  return str(value).replace('|', r'\|')


def _time(value: float) -> str:
  return '–' if not math.isfinite(value) else f'{value:,.0f}'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(['---'] * len(header)) + '|']
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return lines


def _varying(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
  return [n for n in names
          if len({results.value_key(r[n]) for r in rows}) > 1]


def _summary_table(summary: pd.DataFrame, curve: str, estimator: str,
                   timing: str, max_rows: int) -> list[str] | None:
  """Per-setting rows from summary.csv, or None if it lacks the curve."""
  sub = results.select(summary, {'curve': curve, 'estimator': estimator})
  if not len(sub):
    return None
  if 'timing' in sub:
    available = [str(t) for t in results.unique(sub, 'timing')]
    chosen = timing if timing in available else available[0]
    sub = results.select(sub, {'timing': chosen})
  else:
    chosen = timing
  rows = results.rows(sub)
  settings = _varying(rows, [n for n in list(sub.columns)
                             if n not in results.SUMMARY_COLUMNS])
  with_ci = 'ci_low' in sub and 'ci_high' in sub
  header = [_heading(s) for s in settings] + [
      'crossed', f'{estimator} {chosen} (mean ± std)'] + (
          [f'{estimator} 95% CI'] if with_ci else [])
  body = []
  for row in rows[:max_rows]:
    n = results.to_int(row.get('n_seeds'), 1)
    n_crossed = results.to_int(row.get('n_crossed'), n)
    mean, std = float(row.get('mean', math.nan)), float(row.get('std', 0.0))
    if n_crossed == 0 or not math.isfinite(mean):
      time = NOT_CROSSED
    else:
      time = _time(mean) + (f' ± {_time(std)}' if n > 1 and
                            math.isfinite(std) else '')
    cells = [_cell(row[s]) for s in settings] + [f'{n_crossed}/{n}', time]
    if with_ci:
      lo, hi = float(row['ci_low']), float(row['ci_high'])
      cells.append(f'[{_time(lo)}, {_time(hi)}]' if n_crossed and
                   math.isfinite(lo) and math.isfinite(hi) else '–')
    body.append(cells)
  lines = [f'Per setting, from `analysis/summary.csv` (timing `{chosen}`, '
           'in training sequences).', ''] + _table(header, body)
  if len(rows) > max_rows:
    lines += ['', f'({len(rows) - max_rows} more rows in the CSV.)']
  return lines


def _phase_table(phase: pd.DataFrame, curve: str, estimator: str,
                 max_rows: int) -> list[str] | None:
  """Per-run rows from phase_changes.csv, or None if it lacks the curve."""
  sub = results.select(phase, {'curve': curve, 'estimator': estimator})
  if not len(sub):
    return None
  rows = results.rows(sub)
  settings = _varying(rows, [n for n in list(sub.columns) if n != 'run' and n
                             not in results.PHASE_COLUMNS and n
                             not in results.SEED_COLUMNS])
  crossed = (results.as_bool(sub['crossed']) if 'crossed' in sub
             else np.ones(len(sub), dtype=bool))
  timings = [t for t in ('onset', 'midpoint', 'end') if t in sub]
  header = ['run'] + [_heading(s) for s in settings] + [f'{estimator} {t}' for t in timings]
  body = []
  for row, ok in zip(rows[:max_rows], crossed.tolist()):
    cells = [_cell(row.get('run', '–'))] + [_cell(row[s]) for s in settings]
    if ok:
      cells += [_time(float(row[t])) for t in timings]
    else:
      cells += [NOT_CROSSED] * len(timings)
    body.append(cells)
  lines = ['Per run, from `analysis/phase_changes.csv` (training sequences).',
           ''] + _table(header, body)
  if len(rows) > max_rows:
    lines += ['', f'({len(rows) - max_rows} more rows in the CSV.)']
  return lines


def _grid_section(data: results.WorkdirData, max_rows: int) -> list[str]:
  """The grid's axes and one row per run with the settings that vary."""
  if data.runs is None or not len(data.runs):
    return []
  axes = list((data.config or {}).get('grid') or [])
  lines = ['## Grid', '']
  lines += [('Axes: ' + ', '.join(f'`{a}`' for a in axes)) if axes else
            'Axes: none (one run).', '']
  varying = data.varying_settings(include_seeds=True)
  shown = ['run'] + varying + [c for c in ('group', 'status') if c in data.runs]
  rows = results.rows(data.runs)
  body = [[_cell(r.get(c, '–')) for c in shown] for r in rows[:max_rows]]
  lines += _table(['run'] + [_heading(v) for v in varying] + shown[1 + len(varying):], body)
  if len(rows) > max_rows:
    lines += ['', f'({len(rows) - max_rows} more runs in runs.csv.)']
  return lines + ['']


def versions() -> str:
  """The versions of icldyn and the libraries it computed with (without importing them)."""
  out = []
  for name in ('icldyn', 'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint'):
    try:
      out.append(f'{name} {importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      pass
  return ', '.join(out)


def _heading(setting: str) -> str:
  """Column heading for a dotted setting: its last component, as code."""
  return f'`{setting.rsplit(".", 1)[-1]}`'


def _figure_order(paths: Sequence[pathlib.Path]) -> list[pathlib.Path]:
  known = list(CAPTIONS)
  return sorted(paths, key=lambda p: (known.index(p.stem) if p.stem in known
                                      else len(known), p.name))


def _runs_line(data: results.WorkdirData) -> str | None:
  if data.runs is None:
    return None
  n = len(data.runs)
  text = f'{n} run{"s" if n != 1 else ""}'
  if 'status' in data.runs:
    counts = collections.Counter(str(s) for s in data.runs['status'].tolist())
    text += ' (' + ', '.join(f'{c} {s}'
                             for s, c in sorted(counts.items())) + ')'
  varying = data.varying_settings()
  if varying:
    text += '; swept: ' + ', '.join(f'`{v}`' for v in varying)
  seeds = [s for s in data.varying_settings(include_seeds=True)
           if s in results.SEED_COLUMNS]
  if seeds:
    text += '; seeds vary in ' + ', '.join(f'`{s}`' for s in seeds)
  return text + '.'


def write_report(workdir: str | pathlib.Path, *,
                 figures: Sequence[str | pathlib.Path] | None = None,
                 curve: str | None = None,
                 estimator: str = files.HEADLINE_ESTIMATOR,
                 timing: str = 'midpoint',
                 max_rows: int = 200) -> pathlib.Path:
  """Writes `DIR/report.md`.

  Args:
    workdir: the workdir `DIR`.
    figures: image files to embed; by default every PNG in `DIR/plots/`
      (run `icldyn.plots.make_all` first), known figures first.
    curve: the phase-change curve to tabulate (default: the task's headline).
    estimator: the phase-change estimator to tabulate.
    timing: which timing of summary.csv to show (onset/midpoint/end).
    max_rows: table rows beyond this are counted, not listed.

  Returns:
    The path of the report.
  """
  data = results.load_workdir(workdir)
  root = data.path
  lines = [f'# icldyn report: `{root.name or root}`', '']
  runs_line = _runs_line(data)
  if runs_line:
    lines += [runs_line, '']
  lines += _grid_section(data, max_rows)

  curve = curve or data.task['headline']
  lines += ['## Phase-change times', '',
            f'Curve `{curve}`, estimator `{estimator}`; "{NOT_CROSSED}" means '
            'the curve never crossed its timing threshold.', '']
  table = None
  if data.summary is not None and 'curve' in data.summary:
    table = _summary_table(data.summary, curve, estimator, timing, max_rows)
  if table is None and data.phase_changes is not None and (
      'curve' in data.phase_changes):
    table = _phase_table(data.phase_changes, curve, estimator, max_rows)
  lines += table or ['No phase-change results (`analysis/summary.csv`, '
                     '`analysis/phase_changes.csv`) for this curve.']
  lines.append('')

  if figures is None:
    plots = root / files.PLOTS_DIR
    paths = sorted(plots.glob('*.png')) if plots.is_dir() else []
  else:
    paths = [pathlib.Path(f) for f in figures]
  lines += ['## Figures', '']
  if not paths:
    lines += ['No figures in `plots/`.', '']
  for path in _figure_order(paths):
    absolute = path if path.is_absolute() else (pathlib.Path.cwd() / path)
    try:
      rel = absolute.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
      # A figure outside the workdir: keep its path as given.
      rel = path.as_posix()
    caption = CAPTIONS.get(path.stem, path.stem.replace('_', ' '))
    lines += [f'![{path.stem}]({rel})', '', f'*{caption}*', '']

  lines += ['## Versions', '', f'Written with {versions()}.', '']
  out = root / REPORT_NAME
  root.mkdir(parents=True, exist_ok=True)
  out.write_text('\n'.join(lines).rstrip() + '\n')
  logger.info('Wrote %s.', out)
  return out
