"""Matplotlib figures from a workdir's metrics and analysis results.

This module owns the figures: it turns the tables that `icldyn.results`
reads (metrics, progress measures, phase-change times) and arrays handed in
by the caller (attention patterns) into paper-sized PNG/PDF files under
`DIR/plots/`. It never computes a measure itself and never imports JAX, so it
runs wherever numpy and matplotlib do.

Every figure has two entry points: `<name>_figure(...)` builds and returns the
`matplotlib.figure.Figure` (for notebooks and tests), and `plot_<name>(...)`
builds it and writes it, returning the written paths. Both return None, with
one logged line, when the data the figure needs is absent. Figures are
rendered by matplotlib's Agg canvas through `Figure.savefig`, without pyplot,
so the caller's backend and pyplot's global figure list are left alone.

Artists that tests or callers may want to count carry a `gid`: `'curve'` and
`'band'` (phase curves), `'phase'` (phase-change marks), `'ref'` (ln 2 and
threshold lines), `'head'`, `'pair'`, `'timing'` and `'not_crossed'`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import re
import textwrap
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import matplotlib
from matplotlib import lines as mlines
from matplotlib import patches as mpatches
from matplotlib import transforms as mtransforms
from matplotlib.figure import Figure
import numpy as np
import pandas as pd

from icldyn import results
from icldyn.store import files
from icldyn.results import WorkdirData, load_workdir

logger = logging.getLogger(__name__)

DPI = 200
# Okabe & Ito (2008), ordered so that the first few are far apart and yellow,
# which vanishes on white, comes last.
OKABE_ITO = ('#0072B2', '#D55E00', '#009E73', '#E69F00', '#CC79A7',
             '#56B4E9', '#000000', '#F0E442')
COMPOSITION_ORDER = ('q_composition', 'k_composition', 'v_composition')
STEP_LABEL = 'training sequences'

# Panel sizes in inches: about two panels across a 3.3in paper column.
_PANEL_W = 1.7
_PANEL_H = 1.3
_MAX_LEGEND = 14
_STYLE = {
    'font.size': 8,
    'axes.titlesize': 8,
    'axes.labelsize': 8,
    'xtick.labelsize': 7,
    'ytick.labelsize': 7,
    'legend.fontsize': 7,
    'legend.frameon': False,
    'figure.titlesize': 8,
    'figure.labelsize': 8,
    'lines.linewidth': 1.0,
    'axes.linewidth': 0.6,
    'axes.spines.top': False,
    'axes.spines.right': False,
    'xtick.major.width': 0.6,
    'ytick.major.width': 0.6,
    'savefig.facecolor': 'white',
}

Paths = list[pathlib.Path]


# ----------------------------------------------------------------------------
# Shared helpers.


@contextlib.contextmanager
def _style() -> Iterator[None]:
  with matplotlib.rc_context(_STYLE):
    yield


def _skip(figure: str, reason: str) -> None:
  logger.info('Skipping %s: %s.', figure, reason)
  return None


def _as_data(data: WorkdirData | str | pathlib.Path) -> WorkdirData:
  if isinstance(data, WorkdirData):
    return data
  return load_workdir(data)


def _short(name: str) -> str:
  return name.rsplit('.', 1)[-1]


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    if math.isnan(value):
      return '–'
    return f'{value:g}'
  return str(value)


def _label(settings: Mapping[str, Any], runs: Sequence[int]) -> str:
  """Legend text for a group of runs that share `settings`.

  runs.csv's `clamps` column describes the `clamp.*` settings again
  (`keep_head(3)` for `clamp.keep_head=3`), so it is left out when one of
  them is shown: each setting is said once.
  """
  shown = any(k.startswith('clamp.') for k in settings)
  settings = {k: v for k, v in settings.items() if not (shown and k == 'clamps')}
  if settings:
    text = ', '.join(f'{_short(k)}={_fmt(v)}' for k, v in settings.items())
  else:
    text = f'run {runs[0]}' if len(runs) == 1 else 'all runs'
  if len(runs) > 1:
    text += f' (n={len(runs)})'
  return text


def _colors(n: int) -> list[Any]:
  """n colour-blind-safe colours: Okabe–Ito, or viridis for long sweeps."""
  if n <= len(OKABE_ITO):
    return list(OKABE_ITO[:n])
  # Past eight categories no qualitative palette stays distinguishable; an
  # ordered map at least keeps a swept setting's order readable.
  cmap = matplotlib.colormaps['viridis']
  return [cmap(x) for x in np.linspace(0.0, 0.92, n)]


def _spans_decades(values: np.ndarray, ratio: float = 100.0) -> bool:
  """Whether the positive values span more than `ratio` (2 decades)."""
  values = np.asarray(values, dtype=np.float64)
  pos = values[np.isfinite(values) & (values > 0)]
  return bool(pos.size) and pos.max() / pos.min() > ratio


TIME_AXES = ('auto', 'log', 'linear')


def _log_axis(data: WorkdirData, time_axis: str, steps: np.ndarray | None = None) -> bool:
  """Whether the figures' time axis is logarithmic: 'log', 'linear', or 'auto'
  (log when the workdir's evaluation steps span more than two decades), the
  same for every figure of a workdir."""
  if time_axis not in TIME_AXES:
    raise ValueError(f"time_axis must be one of {TIME_AXES}, got {time_axis!r}")
  if time_axis != 'auto':
    return time_axis == 'log'
  if data.metrics is not None and len(data.metrics):
    steps = data.metrics['step'].to_numpy()
  return _spans_decades(steps if steps is not None else np.zeros(0))


def _step_axis(ax: Any, log: bool) -> None:
  if log:
    ax.set_xscale('log')
  else:
    ax.ticklabel_format(axis='x', style='sci', scilimits=(-3, 4))


def _legend_width(labels: Sequence[str], cap: float = 2.8) -> float:
  """Inches to reserve right of the panels for a legend of these labels."""
  if not labels:
    return 0.0
  longest = max(len(s) for s in labels[:_MAX_LEGEND])
  return min(0.5 + 0.052 * longest, cap)


def _legend(fig: Any, handles: Sequence[Any], labels: Sequence[str],
            notes: Sequence[tuple[Any, str]] = ()) -> None:
  """A figure legend right of the panels.

  Args:
    fig: the figure or subfigure.
    handles: one artist per data entry (line, group).
    labels: their texts; past `_MAX_LEGEND` entries they are cut and counted.
    notes: `(handle, label)` pairs for reference lines and notes, always kept
      after the data entries.
  """
  handles, labels = list(handles), list(labels)
  if len(handles) > _MAX_LEGEND:
    extra = len(handles) - (_MAX_LEGEND - 1)
    handles = handles[:_MAX_LEGEND - 1] + [mlines.Line2D([], [], lw=0)]
    labels = labels[:_MAX_LEGEND - 1] + [f'… {extra} more']
  handles += [h for h, _ in notes]
  labels += [l for _, l in notes]
  if handles:
    fig.legend(handles, labels, loc='outside right upper', handlelength=1.6)


def _new_figure(width: float, height: float) -> Figure:
  # Sizes on a 1/32 in grid are exact in binary, so width x dpi has no
  # rounding error and the PNG's pixel size is predictable.
  width, height = (round(v * 32) / 32 for v in (width, height))
  return Figure(figsize=(width, height), layout='constrained')


def _save(fig: Figure, out_dir: str | pathlib.Path, name: str,
          formats: Sequence[str], dpi: int) -> Paths:
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for fmt in formats:
    path = out_dir / f'{name}.{fmt}'
    with _style():
      fig.savefig(path, format=fmt, dpi=dpi)
    paths.append(path)
  return paths


def _mean_series(series: Sequence[tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray]:
  steps, stacked = results.stack_series(series)
  with _quiet_nan_warnings():
    return steps, np.nanmean(stacked, axis=0)


@contextlib.contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
  # A step that every run of a group lacks is expected (runs evaluated on
  # different schedules); its nan is what we want, not a warning.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', category=RuntimeWarning)
    yield


def _row_groups(data: WorkdirData, runs: Sequence[int], average: bool,
                max_rows: int) -> tuple[list[tuple[str, list[int]]], int]:
  """Panel rows: single runs, or seed-averaged settings; capped.

  Returns:
    `(rows, total)`: up to `max_rows` `(label, run_ids)` pairs, and how many
    there would be without the cap.
  """
  if average:
    groups = data.setting_groups(runs)
    rows = [(_label(s, g), g) for s, g in groups]
  else:
    rows = [(_run_title(data, r), [r]) for r in runs]
  return rows[:max_rows], len(rows)


def _run_title(data: WorkdirData, run: int) -> str:
  """`run 2: num_labels=5, init=1`: the run and every setting the grid
  varies, seeds included (a grid over seeds alone names its rows `run 2:
  init=2`)."""
  varying = data.varying_settings(include_seeds=True)
  settings = {k: v for k, v in data.run_settings(run).items() if k in varying}
  return f'run {run}' + (': ' + _label(settings, [run]) if settings else '')


def _row_title(ax: Any, label: str) -> None:
  # Left-aligned over the row's first panel only: a row label repeated over
  # every column would run into its neighbours.
  ax.set_title(label, loc='left', fontsize=7)


def _cap_note(shown: int, total: int, average: bool
              ) -> list[tuple[Any, str]]:
  """A legend note saying how many rows the row cap left out, if any."""
  if total <= shown:
    return []
  what = 'settings' if average else 'runs'
  return [(mlines.Line2D([], [], lw=0), f'showing {shown} of {total} {what}')]


def _phase_times(data: WorkdirData, curve: str, estimator: str,
                 timing: str) -> dict[int, float | None]:
  """Per-run phase-change time of a curve; None where a run never crossed."""
  table = data.phase_changes
  if table is None or 'run' not in table:
    return {}
  sub = results.select(table, {'curve': curve, 'estimator': estimator})
  if not len(sub):
    return {}
  crossed = (results.as_bool(sub['crossed']) if 'crossed' in sub
             else np.ones(len(sub), dtype=bool))
  column = _timing_column(sub, crossed, timing)
  out: dict[int, float | None] = {}
  for run, ok, t in zip(sub['run'].tolist(), crossed.tolist(),
                        sub[column].astype(np.float64).tolist()
                        if column else [math.nan] * len(sub)):
    out[int(run)] = t if ok and math.isfinite(t) else None
  return out


def _timing_column(table: pd.DataFrame, crossed: np.ndarray,
                   preferred: str) -> str | None:
  """The requested timing column, or the first one that has values."""
  candidates = [preferred] + [c for c in ('midpoint', 'onset', 'end')
                              if c != preferred]
  for name in candidates:
    if name in table:
      values = table[name].astype(np.float64)[crossed]
      if np.isfinite(values).any():
        if name != preferred:
          logger.info('Phase-change %s times absent; using %s.', preferred,
                      name)
        return name
  return None


# ----------------------------------------------------------------------------
# 1. Loss and accuracy curves with phase-change marks.


def _evaluators(data: WorkdirData, wanted: Sequence[str]) -> list[str]:
  """Evaluators that logged one of `wanted`: `train`, then the task's order."""
  metrics = data.metrics
  present = set(results.unique(metrics, 'evaluator'))
  has_metric = {e for e in present
                if any(len(results.select(metrics, {'evaluator': e, 'metric': m}))
                       for m in wanted)}
  ordered = [e for e in ['train'] + list(data.task['evaluators']) if e in has_metric]
  return ordered + sorted(has_metric - set(ordered))


def phase_curves_figure(
    data: WorkdirData | str | pathlib.Path,
    *,
    evaluators: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    runs: Sequence[int] | None = None,
    estimator: str = files.HEADLINE_ESTIMATOR,
    timing: str = 'midpoint',
    band: str | None = 'minmax',
    time_axis: str = 'auto',
) -> Figure | None:
  """Each evaluator's loss and accuracy against training sequences.

  One column per evaluator, one row per metric (a metric an evaluator does
  not log leaves its panel out). Runs that differ only by seed are drawn as
  their mean with a band, each seed as a thin line beneath; other runs as
  one line each. Dashed
  vertical lines mark each run's detected phase change of the panel's curve
  (`{evaluator}/{metric}`, else `{evaluator}/loss`); a metric's panels carry
  the task's reference lines (few-shot loss: ln 2 and the threshold 0.4 ln 2).

  Args:
    data: a loaded workdir, or its path.
    evaluators: columns; by default every evaluator that logged one of
      `metrics`, in the canonical order then alphabetically.
    metrics: rows; by default loss and acc, and the headline metric (as
      `loss_repeated` of the token task) first when it is another.
    runs: runs to draw; all by default.
    estimator: which phase_changes.csv estimator marks the curves.
    timing: which of onset/midpoint/end to mark.
    band: 'minmax', 'std' (mean ± std), or None for no band.
    time_axis: 'auto', 'log' or 'linear' (`_log_axis`: the same for every
      figure of a workdir).

  Returns:
    The figure, or None if metrics.csv is missing or empty.
  """
  data = _as_data(data)
  name = 'phase curves'
  if data.metrics is None or not len(data.metrics):
    return _skip(name, 'no metrics.csv')
  if metrics is None:
    headline = data.task['headline'].split('/')[-1]
    metrics = tuple(dict.fromkeys(([headline] if headline else []) + ['loss', 'acc']))
  references = data.task['references']
  evaluators = list(evaluators or _evaluators(data, metrics))
  if not evaluators:
    return _skip(name, f'no evaluator logged {"/".join(metrics)}')
  run_ids = list(runs) if runs is not None else data.run_ids()
  groups = data.setting_groups(run_ids)
  colors = _colors(len(groups))
  log_x = _log_axis(data, time_axis)
  phase: dict[str, dict[int, float | None]] = {}

  def times_for(curve: str) -> dict[int, float | None]:
    if curve not in phase:
      phase[curve] = _phase_times(data, curve, estimator, timing)
    return phase[curve]

  labels = [_label(s, g) for s, g in groups]
  refs = [(label, value) for m in metrics for label, value in references.get(m, ())]
  ref_styles = ((':', '0.55'), ('-.', '0.3'), ((0, (1, 3)), '0.45'))
  ref_labels = [label for label, _ in refs] + [f'phase change ({estimator})']
  legend_w = _legend_width(labels + ref_labels + ['min–max over seeds'])
  with _style():
    fig = _new_figure(len(evaluators) * _PANEL_W + legend_w,
                      len(metrics) * _PANEL_H + 0.45)
    axes = fig.subplots(len(metrics), len(evaluators), sharex=True,
                        sharey='row', squeeze=False)
    any_phase = any_band = False
    empty: set[tuple[int, int]] = set()
    for j, ev in enumerate(evaluators):
      for i, metric in enumerate(metrics):
        ax = axes[i, j]
        series = results.series_by_run(
            data.metrics, {'evaluator': ev, 'metric': metric}, run_ids)
        if not series:  # e.g. `train` logs no accuracy: no empty panel
          empty.add((i, j))
          continue
        # An accuracy panel without its own detected change shows the loss's.
        times = (times_for(f'{ev}/{metric}') or times_for(f'{ev}/loss'))
        for (_, group), color in zip(groups, colors):
          present = [series[r] for r in group if r in series]
          if present:
            any_band |= _draw_group(ax, present, color, band)
          for r in group:
            t = times.get(r)
            if t is not None:
              ax.axvline(t, color=color, ls='--', lw=0.7, alpha=0.8,
                         gid='phase')
              any_phase = True
        for k, (_, value) in enumerate(references.get(metric, ())):
          ls, color = ref_styles[k % len(ref_styles)]
          ax.axhline(value, color=color, ls=ls, lw=0.8, gid='ref')
        if metric.startswith('acc'):
          ax.set_ylim(-0.03, 1.03)
        if i == 0:
          ax.set_title(ev)
        _step_axis(ax, log_x)
    for i, metric in enumerate(metrics):
      # The row's label and tick labels go on its first panel with data.
      first = next((j for j in range(len(evaluators)) if (i, j) not in empty), None)
      if first is not None:
        axes[i, first].set_ylabel(metric)
        axes[i, first].tick_params(axis='y', labelleft=True)
    for j in range(len(evaluators)):
      # A column whose bottom panel is gone shows its time ticks on its lowest panel.
      lowest = max((i for i in range(len(metrics)) if (i, j) not in empty), default=None)
      if lowest is not None:
        axes[lowest, j].tick_params(axis='x', labelbottom=True)
    for i, j in empty:
      if i == 0:  # keep the column's title: hide the panel, not its title
        axes[i, j].set_title(evaluators[j])
        axes[i, j].set_axis_off()
      else:
        axes[i, j].remove()
    fig.supxlabel(STEP_LABEL)

    notes = []
    if any_band:
      notes.append((mpatches.Patch(color='0.6', alpha=0.35, lw=0),
                    'mean ± std over seeds' if band == 'std'
                    else 'min–max over seeds'))
    for m in metrics:
      for k, (label, _) in enumerate(references.get(m, ())):
        ls, color = ref_styles[k % len(ref_styles)]
        notes.append((mlines.Line2D([], [], color=color, ls=ls), label))
    if any_phase:
      notes.append((mlines.Line2D([], [], color='0.3', ls='--', lw=0.7),
                    ref_labels[-1]))
    _legend(fig, [mlines.Line2D([], [], color=c) for c in colors], labels,
            notes)
  return fig


def _draw_group(ax: Any, series: Sequence[tuple[np.ndarray, np.ndarray]],
                color: Any, band: str | None) -> bool:
  """Draws one run, or a mean with a band; returns whether a band was drawn."""
  if len(series) == 1:
    ax.plot(*series[0], color=color, gid='curve')
    return False
  steps, stacked = results.stack_series(series)
  with _quiet_nan_warnings():
    mean = np.nanmean(stacked, axis=0)
    if band == 'std':
      std = np.nanstd(stacked, axis=0)
      low, high = mean - std, mean + std
    else:
      low, high = np.nanmin(stacked, axis=0), np.nanmax(stacked, axis=0)
  for run_steps, values in series:  # each seed, thin, under the mean and its band
    ax.plot(run_steps, values, color=color, lw=0.4, alpha=0.55, gid='seed')
  ax.plot(steps, mean, color=color, gid='curve')
  if band is None:
    return False
  ok = np.isfinite(low) & np.isfinite(high)
  ax.fill_between(steps[ok], low[ok], high[ok], color=color, alpha=0.25,
                  lw=0, gid='band')
  return True


def plot_phase_curves(data: WorkdirData | str | pathlib.Path,
                      out_dir: str | pathlib.Path, *,
                      name: str = 'phase_curves',
                      formats: Sequence[str] = ('png',), dpi: int = DPI,
                      **kwargs: Any) -> Paths | None:
  """Writes `phase_curves_figure(data, **kwargs)` to `out_dir/name.{fmt}`.

  Returns:
    The written paths, or None if the figure was skipped.
  """
  fig = phase_curves_figure(data, **kwargs)
  return None if fig is None else _save(fig, out_dir, name, formats, dpi)


# ----------------------------------------------------------------------------
# 2. Per-head progress measures.


def _head_series(data: WorkdirData, measure: str, evaluator: str, source: str,
                 last_layer: bool, runs: Sequence[int]
                 ) -> dict[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
  """run -> head -> (steps, values) of a per-head measure.

  metrics.csv logs it during training as `{measure}.h{h}`; progress.csv has
  it per layer from the checkpoint stream, where the figure wants the last
  layer (induction) or the first (previous-token).
  """
  out: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
  if source in ('auto', 'metrics') and data.metrics is not None:
    pattern = re.compile(rf'^{re.escape(measure)}\.h(\d+)$')
    names = results.unique(results.select(data.metrics, {'evaluator': evaluator}), 'metric')
    for metric in names:
      match = pattern.match(str(metric))
      if not match:
        continue
      per_run = results.series_by_run(
          data.metrics, {'evaluator': evaluator, 'metric': metric}, runs)
      for r, s in per_run.items():
        out.setdefault(r, {})[int(match.group(1))] = s
    if out or source == 'metrics':
      return out
  if source in ('auto', 'progress') and data.progress is not None:
    sub = results.select(data.progress, {'measure': measure})
    if not len(sub):
      return out
    layers = sub['layer'].to_numpy(np.float64)
    layer = np.nanmax(layers) if last_layer else np.nanmin(layers)
    sub = sub[layers == layer]
    for head in results.unique(sub, 'head'):
      per_run = results.series_by_run(sub, {'head': head}, runs)
      for r, s in per_run.items():
        out.setdefault(r, {})[int(head)] = s
  return out


def progress_heads_figure(
    data: WorkdirData | str | pathlib.Path,
    *,
    source: str = 'auto',
    evaluator: str | None = None,
    runs: Sequence[int] | None = None,
    average: bool = False,
    max_rows: int = 4,
    estimator: str = files.HEADLINE_ESTIMATOR,
    time_axis: str = 'auto',
) -> Figure | None:
  """The induction score of last-layer heads and previous-token score of
  first-layer heads over training, one line per head; dashed lines mark each
  run's phase change of the task's headline curve.

  Args:
    data: a loaded workdir, or its path.
    source: 'metrics' (`{induction}.h{h}` / `prev_token.h{h}` of
      `evaluator` in metrics.csv, with the task's induction score name:
      `induction_strength` few-shot, `prefix_matching` tokens), 'progress'
      (analysis/progress.csv), or 'auto' (metrics.csv when it has them).
    evaluator: the metrics.csv evaluator to read (default: the headline's).
    runs: runs to show; all by default.
    average: one row per seed-averaged setting instead of one per run.
    max_rows: at most this many rows; the rest are noted in the title.
    estimator: the estimator of the phase-change marks.
    time_axis: 'auto', 'log' or 'linear' (`_log_axis`).

  Returns:
    The figure (rows = runs or settings, columns = the two measures), or
    None if neither measure is available.
  """
  data = _as_data(data)
  run_ids = list(runs) if runs is not None else data.run_ids()
  evaluator = evaluator or data.task['headline'].split('/')[0]
  induction = data.task['induction_metric']
  measures = [(induction, induction.replace('_', ' '), True),
              ('prev_token', 'prev-token score', False)]
  found = []
  for measure, title, last in measures:
    per_run = _head_series(data, measure, evaluator, source, last, run_ids)
    if per_run:
      found.append((title, per_run))
  if not found:
    return _skip('progress heads', f'no {induction} or prev_token '
                 'values in metrics.csv or analysis/progress.csv')
  with_data = sorted(set().union(*(p.keys() for _, p in found)))
  rows, total = _row_groups(data, [r for r in run_ids if r in with_data]
                            or with_data, average, max_rows)
  heads = sorted(set().union(*(h.keys() for _, p in found
                               for h in p.values())))
  colors = dict(zip(heads, _colors(len(heads))))
  steps = np.concatenate([s for _, p in found for h in p.values()
                          for s, _ in h.values()])
  log_x = _log_axis(data, time_axis, steps)
  labels = [f'head {h}' for h in heads]
  num_layers = ((data.config or {}).get('config', {}).get('model', {}) or {}).get('num_layers')
  layer_of = {True: num_layers - 1 if num_layers else None, False: 0}
  lasts = {title: last for _, title, last in measures}
  headline = data.task['headline']
  times = _phase_times(data, headline, estimator, 'midpoint') if headline else {}

  with _style():
    fig = _new_figure(len(found) * _PANEL_W * 1.15 + _legend_width(labels),
                      len(rows) * _PANEL_H + 0.45)
    axes = fig.subplots(len(rows), len(found), sharex=True, sharey='col',
                        squeeze=False)
    for i, (row_label, group) in enumerate(rows):
      for j, (title, per_run) in enumerate(found):
        ax = axes[i, j]
        for h in heads:
          series = [per_run[r][h] for r in group
                    if r in per_run and h in per_run[r]]
          if series:
            ax.plot(*_mean_series(series), color=colors[h], gid='head')
        ax.axhline(0.0, color='0.7', lw=0.5, zorder=0)
        marks = [times[r] for r in group if times.get(r) is not None]
        for t in marks:
          ax.axvline(t, color='0.3', ls='--', lw=0.7, gid='phase')
        if j == 0:
          _row_title(ax, row_label)
        layer = layer_of[lasts[title]]
        ax.set_ylabel(title if layer is None else f'{title} (L{layer})')
        _step_axis(ax, log_x)
    fig.supxlabel(STEP_LABEL)
    notes = _cap_note(len(rows), total, average)
    if times:
      notes = [(mlines.Line2D([], [], color='0.3', ls='--', lw=0.7),
                f'phase change of {headline} ({estimator})')] + notes
    _legend(fig, [mlines.Line2D([], [], color=colors[h]) for h in heads], labels, notes)
  return fig


def plot_progress_heads(data: WorkdirData | str | pathlib.Path,
                        out_dir: str | pathlib.Path, *,
                        name: str = 'progress_heads',
                        formats: Sequence[str] = ('png',), dpi: int = DPI,
                        **kwargs: Any) -> Paths | None:
  """Writes `progress_heads_figure(data, **kwargs)`; see `plot_phase_curves`."""
  fig = progress_heads_figure(data, **kwargs)
  return None if fig is None else _save(fig, out_dir, name, formats, dpi)


# ----------------------------------------------------------------------------
# 3. Phase-change time against the data properties of the grid.


def _timing_points(data: WorkdirData, curve: str, estimator: str,
                   timing: str, errors: str) -> list[dict[str, Any]] | None:
  """Seed-aggregated phase-change times, one dict per setting.

  Each dict has `settings` (setting -> value, seeds excluded), `mean`, `low`
  and `high` (error-bar ends), `n` and `n_crossed`. summary.csv is used when
  it has the curve, so the figure shows what the analysis reported;
  phase_changes.csv is aggregated here otherwise.
  """
  summary = data.summary
  if summary is not None and 'curve' in summary:
    sub = results.select(summary, {'curve': curve, 'estimator': estimator})
    if len(sub) and 'timing' in sub:
      available = [str(t) for t in results.unique(sub, 'timing')]
      chosen = timing if timing in available else (
          'midpoint' if 'midpoint' in available else available[0])
      sub = results.select(sub, {'timing': chosen})
    if len(sub):
      return _summary_points(sub, errors)
  table = data.phase_changes
  if table is None or 'curve' not in table:
    return None
  sub = results.select(table, {'curve': curve, 'estimator': estimator})
  if not len(sub):
    return None
  crossed = (results.as_bool(sub['crossed']) if 'crossed' in sub
             else np.ones(len(sub), dtype=bool))
  column = _timing_column(sub, crossed, timing)
  times = (sub[column].astype(np.float64) if column
           else np.full(len(sub), np.nan))
  setting_names = [n for n in list(sub.columns) if n not in results.PHASE_COLUMNS
                   and n != 'run' and n not in results.SEED_COLUMNS]
  groups: dict[tuple[Any, ...], list[int]] = {}
  rows = results.rows(sub)
  for i, row in enumerate(rows):
    key = tuple(results.value_key(row[n]) for n in setting_names)
    groups.setdefault(key, []).append(i)
  points = []
  for idx in groups.values():
    ok = [times[i] for i in idx if crossed[i] and math.isfinite(times[i])]
    mean = float(np.mean(ok)) if ok else math.nan
    std = float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0
    points.append({
        'settings': {n: rows[idx[0]][n] for n in setting_names},
        'mean': mean, 'low': mean - std, 'high': mean + std,
        'n': len(idx), 'n_crossed': len(ok)})
  return points


def _summary_points(sub: pd.DataFrame, errors: str) -> list[dict[str, Any]]:
  setting_names = [n for n in list(sub.columns) if n not in results.SUMMARY_COLUMNS
                   and n not in results.SEED_COLUMNS]
  points = []
  for row in results.rows(sub):
    mean = float(row.get('mean', math.nan))
    if errors == 'ci' and 'ci_low' in row and 'ci_high' in row:
      low, high = float(row['ci_low']), float(row['ci_high'])
    else:
      std = float(row.get('std', 0.0))
      std = 0.0 if math.isnan(std) else std
      low, high = mean - std, mean + std
    n = results.to_int(row.get('n_seeds'), 1)
    n_crossed = results.to_int(row.get('n_crossed'),
                               n if math.isfinite(mean) else 0)
    points.append({'settings': {k: row[k] for k in setting_names},
                   'mean': mean, 'low': low, 'high': high,
                   'n': n, 'n_crossed': n_crossed})
  return points


def _varying(points: Sequence[Mapping[str, Any]], name: str) -> bool:
  values = {results.value_key(p['settings'].get(name)) for p in points}
  return len(values) > 1


def timing_vs_data_figure(
    data: WorkdirData | str | pathlib.Path,
    *,
    curve: str | None = None,
    estimator: str = files.HEADLINE_ESTIMATOR,
    timing: str = 'midpoint',
    axes: Sequence[str] | None = None,
    errors: str = 'std',
) -> Figure | None:
  """Phase-change time against each data property the grid sweeps.

  One panel per swept data setting; within a panel one line per combination
  of the other swept settings (the clamp condition first), with error bars
  over seeds. A setting whose runs never crossed is an open marker at the top
  of the panel; one where only some crossed is annotated `crossed/total`.

  Args:
    data: a loaded workdir, or its path.
    curve: the phase_changes.csv / summary.csv curve (default: the task's
      headline).
    estimator: the estimator whose times are plotted.
    timing: onset, midpoint or end (falls back to what exists).
    axes: x-axis settings; by default the task's per-run data settings
      (`data_axes` of config.json's task facts) that take more than one value.
    errors: 'std' over seeds, or 'ci' (summary.csv's ci_low/ci_high).

  Returns:
    The figure, or None without phase-change results or a swept data
    setting.
  """
  data = _as_data(data)
  name = 'timing vs data'
  curve = curve or data.task['headline']
  points = _timing_points(data, curve, estimator, timing, errors)
  if not points:
    return _skip(name, f'no {estimator} phase-change times for {curve} in '
                 'analysis/summary.csv or analysis/phase_changes.csv')
  settings = list(points[0]['settings'])
  if axes is None:
    axes = [a for a in data.task['data_axes'] if a in settings and _varying(points, a)
            and all(isinstance(p['settings'][a], (int, float)) for p in points)]
  if not axes:
    return _skip(name, 'no data setting varies across the grid')
  never = any(p['n_crossed'] == 0 for p in points)
  finite = [p['mean'] for p in points if math.isfinite(p['mean'])]
  log_y = _spans_decades(np.asarray(finite))
  never_note = (mlines.Line2D([], [], ls='none', marker='o', ms=4, mfc='none',
                              mec='0.3'), 'never crossed (at top)')
  # Each panel's lines are keyed by every other swept setting (the clamp
  # condition first), so a line never mixes points of different settings.
  # `clamps` is a readable summary of the clamp.* fields: when those vary,
  # keying lines by it too would only repeat them.
  clamp_fields = any(s.startswith('clamp.') and _varying(points, s) for s in settings)
  keys = [s for s in settings if not (s == 'clamps' and clamp_fields)]
  panel_lines = [_timing_lines(points, axis, [
      s for s in keys if s != axis and _varying(points, s)])
                 for axis in axes]
  legend_w = _legend_width([l for lines in panel_lines for l in lines]
                           + [never_note[1]], cap=6.0)
  # Each row is tall enough for its legend (about 0.15 in per entry).
  entries = max([min(len(lines), _MAX_LEGEND) + 1 for lines in panel_lines] + [1])
  row_h = max(_PANEL_H + 0.35, 0.15 * entries + 0.4)

  with _style():
    # One row per swept axis, each with its own legend: panels may key their
    # lines by different settings, so a shared legend would mislead.
    fig = _new_figure(_PANEL_W * 1.2 + 0.3 + legend_w, len(axes) * row_h + 0.2)
    rows = fig.subfigures(len(axes), 1, squeeze=False)[:, 0]
    panels = [row.subplots() for row in rows]
    for ax in panels[1:]:
      ax.sharey(panels[0])
    for row, ax, axis, lines in zip(rows, panels, axes, panel_lines):
      top = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
      colors = _colors(len(lines))
      for mine, color in zip(lines.values(), colors):
        _draw_timing_line(ax, top, mine, axis, color)
      ax.set_xlabel(_short(axis))
      ax.set_ylabel(f'phase change ({timing})')
      if not log_y:
        ax.ticklabel_format(axis='y', style='sci', scilimits=(-3, 4))
      xs_all = np.array([p['settings'][axis] for p in points],
                        dtype=np.float64)
      if _spans_decades(xs_all, ratio=10.0):
        ax.set_xscale('log', base=2 if _powers_of_two(xs_all) else 10)
      if log_y:
        ax.set_yscale('log')
      notes = [never_note] if never else []
      if list(lines) != ['all'] or never:
        _legend(row, [mlines.Line2D([], [], color=c, marker='o', ms=3.5)
                      for c in colors], list(lines), notes)
    if never:
      _headroom(panels[0], log_y)
    panels[0].set_title(f'{curve}, {estimator} ({STEP_LABEL})', loc='left',
                        fontsize=7)
  return fig


def _timing_lines(points: Sequence[dict[str, Any]], axis: str,
                  others: list[str]) -> dict[str, list[dict[str, Any]]]:
  """Splits one panel's points into lines, label -> points sorted by x."""
  if 'clamp.condition' in others:
    others.remove('clamp.condition')
    others.insert(0, 'clamp.condition')
  lines: dict[tuple[Any, ...], tuple[str, list[dict[str, Any]]]] = {}
  for p in points:
    values = [p['settings'].get(o) for o in others]
    key = tuple(results.value_key(v) for v in values)
    label = ', '.join(f'{_short(o)}={_fmt(v)}'
                      for o, v in zip(others, values))
    lines.setdefault(key, (label, []))[1].append(p)
  return {label or 'all': sorted(mine, key=lambda p: p['settings'][axis])
          for label, mine in lines.values()}


def _draw_timing_line(ax: Any, top: Any, mine: Sequence[dict[str, Any]],
                      axis: str, color: Any) -> None:
  """Error-bar line of crossed settings; open markers for never-crossed."""
  xs = np.array([p['settings'][axis] for p in mine], dtype=np.float64)
  ys = np.array([p['mean'] for p in mine])
  ok = np.array([p['n_crossed'] > 0 and math.isfinite(p['mean'])
                 for p in mine], dtype=bool)
  if ok.any():
    lows = np.array([p['low'] for p in mine])[ok]
    highs = np.array([p['high'] for p in mine])[ok]
    yerr = np.vstack([np.maximum(ys[ok] - lows, 0.0),
                      np.maximum(highs - ys[ok], 0.0)])
    bars = ax.errorbar(xs[ok], ys[ok], yerr=yerr, color=color, marker='o',
                       ms=3.5, capsize=2, lw=1.0, elinewidth=0.8)
    bars.lines[0].set_gid('timing')
    for p, x, y in zip([m for m, k in zip(mine, ok) if k], xs[ok], ys[ok]):
      if p['n_crossed'] < p['n']:
        ax.annotate(f'{p["n_crossed"]}/{p["n"]}', (x, y),
                    textcoords='offset points', xytext=(3, 3), fontsize=6,
                    color=color)
  if (~ok).any():
    # Pinned near the top in axes coordinates: a run that never crossed has
    # no time, only "later than the end of training".
    ax.plot(xs[~ok], np.full(int((~ok).sum()), 0.96), transform=top,
            ls='none', marker='o', ms=4, mfc='none', mec=color,
            clip_on=False, gid='not_crossed')


def _headroom(ax: Any, log: bool, fraction: float = 0.15) -> None:
  """Raises the top of the y range so markers pinned there clear the data."""
  low, high = ax.get_ylim()
  if log:
    high *= (high / low) ** fraction
  else:
    high += fraction * (high - low)
  ax.set_ylim(low, high)


def _powers_of_two(values: np.ndarray) -> bool:
  values = values[np.isfinite(values)]
  return bool(values.size) and bool(np.all(values > 0)) and bool(
      np.all(np.log2(values) == np.round(np.log2(values))))


def plot_timing_vs_data(data: WorkdirData | str | pathlib.Path,
                        out_dir: str | pathlib.Path, *,
                        name: str = 'timing_vs_data',
                        formats: Sequence[str] = ('png',), dpi: int = DPI,
                        **kwargs: Any) -> Paths | None:
  """Writes `timing_vs_data_figure(data, **kwargs)`; see `plot_phase_curves`."""
  fig = timing_vs_data_figure(data, **kwargs)
  return None if fig is None else _save(fig, out_dir, name, formats, dpi)


# ----------------------------------------------------------------------------
# 4. Attention patterns at several checkpoints.


ATTENTION_KEYS = ('runs', 'run_labels', 'steps', 'mean', 'examples', 'example_labels',
                  'position_labels', 'prev_head', 'induction_head')


def _ticks(ax: Any, labels: Sequence[str], axis: str) -> None:
  """Token labels on one axis of a heatmap: every position up to 24, else
  every k-th so that at most 16 are written."""
  n = len(labels)
  every = 1 if n <= 24 else -(-n // 16)
  idx = list(range(0, n, every))
  size = 6 if n <= 12 else 5
  if axis == 'x':
    ax.set_xticks(idx, [labels[i] for i in idx], rotation=90, fontsize=size)
  else:
    ax.set_yticks(idx, [labels[i] for i in idx], fontsize=size)


def attention_patterns_figure(patterns: Mapping[str, np.ndarray] | None, *,
                              max_rows: int = 6, title: str | None = None) -> Figure | None:
  """Attention heatmaps of chosen runs at chosen checkpoints, with token labels.

  One row per (run, checkpoint). Per row: the first-layer head with the
  highest previous-token score and the last-layer head with the highest
  induction score (chosen at the last checkpoint), each averaged over the
  analysis sequences and on individual sequences; then every last-layer
  head's attention from the last position (the few-shot query) over the
  keys. Axes name what each position holds (`x1 y1 ... q`, or the tokens).

  Args:
    patterns: the arrays of `analysis/attention_patterns.npz`
      (`icldyn.analysis.attention`; keys `ATTENTION_KEYS`).
    max_rows: at most this many rows (runs x checkpoints, in order).
    title: optional figure title.

  Returns:
    The figure, or None without patterns.

  Raises:
    ValueError: arrays missing or of inconsistent shapes.
  """
  if patterns is None:
    return _skip('attention patterns', 'no attention patterns given')
  missing = [k for k in ATTENTION_KEYS if k not in patterns]
  if missing:
    raise ValueError(f'attention patterns lack {missing} (written by an older icldyn: run '
                     '`icldyn plot` again to recompute them)')
  mean = np.asarray(patterns['mean'], np.float32)  # [R, S, L, H, T, T]
  examples = np.asarray(patterns['examples'], np.float32)  # [R, S, E, L, H, T, T]
  if mean.ndim != 6 or examples.shape[:2] != mean.shape[:2]:
    raise ValueError(f'mean must be [R, S, L, H, T, T] and examples [R, S, E, ...], got '
                     f'{mean.shape} and {examples.shape}')
  n_runs, n_steps, n_layers, n_heads, t = mean.shape[:5]
  n_ex = examples.shape[2]
  rows = [(r, s) for r in range(n_runs) for s in range(n_steps)][:max_rows]
  pos = [str(x) for x in patterns['position_labels']]
  cols = 2 * (1 + n_ex) + 1
  size = 1.25 if t <= 12 else 1.9
  with _style():
    fig = _new_figure(cols * (size + 0.35) + 1.2, len(rows) * (size + 0.75) + 0.6)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    image = None
    for i, (r, s) in enumerate(rows):
      heads = ((0, int(patterns['prev_head'][r]), 'prev-token'),
               (n_layers - 1, int(patterns['induction_head'][r]), 'induction'))
      c = 0
      for layer, head, role in heads:
        for e in range(-1, n_ex):
          ax = axes[i, c]
          c += 1
          grid = mean[r, s, layer, head] if e < 0 else examples[r, s, e, layer, head]
          labels = pos if e < 0 else [str(x) for x in patterns['example_labels'][r, e]]
          image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap='viridis', interpolation='nearest')
          ax.spines[['top', 'right']].set_visible(True)
          _ticks(ax, labels, 'x')
          _ticks(ax, labels, 'y')
          which = 'mean' if e < 0 else f'sequence {e + 1}'
          ax.set_title(f'L{layer} H{head} ({role}), {which}', fontsize=6)
      ax = axes[i, c]
      query = mean[r, s, n_layers - 1, :, t - 1, :]  # [H, T] attention from the last position
      ax.imshow(query, vmin=0.0, vmax=1.0, cmap='viridis', interpolation='nearest', aspect='auto')
      ax.spines[['top', 'right']].set_visible(True)
      _ticks(ax, pos, 'x')
      ax.set_yticks(range(n_heads), [f'H{h}' for h in range(n_heads)], fontsize=5)
      ax.set_title(f'L{n_layers - 1} from {pos[-1]}, every head (mean)', fontsize=6)
      label = textwrap.fill(str(patterns['run_labels'][r]), 34)
      axes[i, 0].set_ylabel(f'{label}\nat {int(patterns["steps"][s]):,} seq.\nquery position',
                            fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label='attention', aspect=30)
    fig.supxlabel('key position (what it holds)', fontsize=8)
    if title:
      fig.suptitle(title)
  return fig


def plot_attention_patterns(patterns: Mapping[str, np.ndarray] | None,
                            out_dir: str | pathlib.Path, *,
                            name: str = 'attention_patterns',
                            formats: Sequence[str] = ('png',), dpi: int = DPI,
                            **kwargs: Any) -> Paths | None:
  """Writes `attention_patterns_figure(patterns, **kwargs)`."""
  fig = attention_patterns_figure(patterns, **kwargs)
  return None if fig is None else _save(fig, out_dir, name, formats, dpi)


# ----------------------------------------------------------------------------
# 5. Composition scores between head pairs.


def _composition_measures(progress: pd.DataFrame) -> list[str]:
  present = [str(m) for m in results.unique(progress, 'measure')
             if str(m).endswith('_composition')]
  ordered = [m for m in COMPOSITION_ORDER if m in present]
  return ordered + sorted(set(present) - set(ordered))


def composition_figure(
    data: WorkdirData | str | pathlib.Path,
    *,
    runs: Sequence[int] | None = None,
    average: bool = False,
    max_rows: int = 4,
    highlight: int = 3,
    time_axis: str = 'auto',
) -> Figure | None:
  """Q/K/V-composition scores of head pairs over training.

  Reads progress.csv rows whose measure ends in `_composition`; `layer,head`
  is the later head and `layer2,head2` the earlier one. One column per
  measure, one row per run (or seed-averaged setting), one line per pair.
  With many pairs, each row's `highlight` pairs with the largest final score
  in that row keep a colour (the same in every row) and a legend entry; the
  rest are thin grey lines. Heads are named `L{layer}H{head}` as in the
  other figures; a dotted line marks 0, the score of random circuits of the
  same shapes (`icldyn.analysis.weights` subtracts that baseline).

  Args:
    data: a loaded workdir, or its path.
    runs: runs to show; all by default.
    average: one row per seed-averaged setting instead of one per run.
    max_rows: at most this many rows.
    highlight: how many pairs per figure get a colour.

  Returns:
    The figure, or None if progress.csv has no composition measure.
  """
  data = _as_data(data)
  progress = data.progress
  if progress is None or 'measure' not in progress:
    return _skip('composition', 'no analysis/progress.csv')
  measures = _composition_measures(progress)
  if not measures:
    return _skip('composition', 'no *_composition measure in progress.csv')
  run_ids = list(runs) if runs is not None else sorted(
      int(r) for r in results.unique(progress, 'run'))

  per_measure: dict[str, dict[tuple[int, int, int, int],
                              dict[int, tuple[np.ndarray, np.ndarray]]]] = {}
  for m in measures:
    sub = results.select(progress, {'measure': m})
    keys = {tuple(int(v) for v in k)
            for k in zip(sub['layer2'].tolist(), sub['head2'].tolist(),
                         sub['layer'].tolist(), sub['head'].tolist())}
    per_measure[m] = {
        k: results.series_by_run(sub, {'layer2': k[0], 'head2': k[1],
                                       'layer': k[2], 'head': k[3]}, run_ids)
        for k in sorted(keys)}
  with_data = sorted({r for pairs in per_measure.values()
                      for s in pairs.values() for r in s})
  rows, total = _row_groups(data, [r for r in run_ids if r in with_data],
                            average, max_rows)
  if not rows:
    return _skip('composition', 'no composition values for the chosen runs')

  # Pick each row's highlighted pairs by their final score in that row, so
  # the legend names the pairs that ended up composing in some run; a pair
  # keeps its colour across rows.
  def top_pairs(group: Sequence[int]) -> list[tuple[int, int, int, int]]:
    finals: dict[tuple[int, int, int, int], float] = {}
    for pairs in per_measure.values():
      for k, s in pairs.items():
        last = [s[r][1][-1] for r in group if r in s and len(s[r][1])]
        if last:
          finals[k] = max(finals.get(k, -math.inf), float(np.nanmax(last)))
    ranked = sorted(finals, key=lambda k: -finals[k])
    return ranked if len(ranked) <= max(highlight, 1) else ranked[:highlight]

  all_pairs = sorted({k for pairs in per_measure.values() for k in pairs})
  per_row = [set(top_pairs(group)) for _, group in rows]
  shown = sorted(set().union(*per_row))
  colors = dict(zip(shown, _colors(len(shown))))
  labels = [f'L{k[0]}H{k[1]}→L{k[2]}H{k[3]}' for k in shown]
  steps = np.concatenate([s for pairs in per_measure.values()
                          for runs_s in pairs.values()
                          for s, _ in runs_s.values()])
  log_x = _log_axis(data, time_axis, steps)

  with _style():
    fig = _new_figure(len(measures) * _PANEL_W * 1.15 + _legend_width(
        labels + ['other pairs']), len(rows) * _PANEL_H + 0.45)
    axes = fig.subplots(len(rows), len(measures), sharex=True, sharey='col',
                        squeeze=False)
    for i, (row_label, group) in enumerate(rows):
      for j, m in enumerate(measures):
        ax = axes[i, j]
        # Grey pairs first so the coloured ones are drawn on top.
        for k in sorted(per_measure[m], key=lambda k: k in per_row[i]):
          series = [per_measure[m][k][r] for r in group
                    if r in per_measure[m][k]]
          if not series:
            continue
          if k in per_row[i]:
            ax.plot(*_mean_series(series), color=colors[k], gid='pair')
          else:
            ax.plot(*_mean_series(series), color='0.75', lw=0.5, gid='pair')
        if m in COMPOSITION_ORDER:  # scores have the random-circuit baseline subtracted
          ax.axhline(0.0, color='0.3', ls=':', lw=0.8, gid='baseline')
        if j == 0:
          _row_title(ax, row_label)
        ax.set_ylabel(m.replace('_', ' '))
        _step_axis(ax, log_x)
    fig.supxlabel(STEP_LABEL)
    notes = [(mlines.Line2D([], [], color='0.3', ls=':', lw=0.8),
              'random circuits (baseline, subtracted)')]
    if len(shown) < len(all_pairs):
      notes.append((mlines.Line2D([], [], color='0.75', lw=0.5),
                    f'other pairs ({len(all_pairs) - len(shown)})'))
    _legend(fig, [mlines.Line2D([], [], color=colors[k]) for k in shown],
            labels, notes + _cap_note(len(rows), total, average))
  return fig


def plot_composition(data: WorkdirData | str | pathlib.Path,
                     out_dir: str | pathlib.Path, *,
                     name: str = 'composition',
                     formats: Sequence[str] = ('png',), dpi: int = DPI,
                     **kwargs: Any) -> Paths | None:
  """Writes `composition_figure(data, **kwargs)`; see `plot_phase_curves`."""
  fig = composition_figure(data, **kwargs)
  return None if fig is None else _save(fig, out_dir, name, formats, dpi)


# ----------------------------------------------------------------------------
# Everything at once.

# Optional file an analysis step may leave for `make_all`: arrays `patterns`
# [n_ckpt, layers, heads, T, T] and `steps` [n_ckpt], and optionally `run`.
ATTENTION_FILE = files.ATTENTION_NPZ


def make_all(workdir: str | pathlib.Path, pdf: bool = False, *,
             attention: Mapping[str, np.ndarray] | None = None,
             dpi: int = DPI, time_axis: str = 'auto') -> Paths:
  """Writes every figure the workdir has data for under `DIR/plots/`.

  Args:
    workdir: the workdir `DIR`.
    pdf: also write a PDF of each figure.
    attention: the arrays of `analysis/attention_patterns.npz` to draw
      (`attention_patterns_figure`); by default read from that file when it
      exists.
    dpi: PNG resolution.
    time_axis: 'auto', 'log' or 'linear': the training-time axis of every
      figure that has one (`_log_axis`).

  Returns:
    The written paths (PNG, then PDF, per figure), in figure order.
  """
  data = load_workdir(workdir)
  out_dir = data.path / files.PLOTS_DIR
  formats = ('png', 'pdf') if pdf else ('png',)
  paths: Paths = []
  _log_axis(data, time_axis)  # a bad value fails before any figure is written
  timed = (plot_phase_curves, plot_progress_heads, plot_composition)
  for plot in (plot_phase_curves, plot_progress_heads, plot_timing_vs_data,
               plot_composition, plot_patching):
    extra = {'time_axis': time_axis} if plot in timed else {}
    paths += plot(data, out_dir, formats=formats, dpi=dpi, **extra) or []
  if attention is None and (data.path / ATTENTION_FILE).is_file():
    with np.load(data.path / ATTENTION_FILE) as f:
      attention = {k: f[k] for k in f.files}
  if attention is not None and all(k in attention for k in ATTENTION_KEYS):
    paths += plot_attention_patterns(attention, out_dir, formats=formats, dpi=dpi) or []
  else:
    _skip('attention patterns', f'none given and no current {ATTENTION_FILE} '
          '(`icldyn plot` computes it)')
  if not paths:
    logger.info('No figures written for %s.', data.path)
  return paths


# ----------------------------------------------------------------------------
# Circuit formation (`icldyn patch`: analysis/patching.csv, patching.json).

PATCHING_METRIC = 'logit_diff'


def _patching_tables(data: WorkdirData) -> tuple[pd.DataFrame | None, dict[str, Any]]:
  """patching.csv (logit-difference rows) and patching.json, or (None, {})."""
  table = results.read_table(data.path / files.PATCHING_CSV)
  meta_path = data.path / files.PATCHING_JSON
  if table is None or table.empty or not meta_path.is_file():
    return None, {}
  meta = json.loads(meta_path.read_text())
  table = table[table['metric'] == meta.get('metric', PATCHING_METRIC)].copy()
  for col in ('receiver', 'input'):
    table[col] = table[col].fillna('').astype(str)
  table['edge'] = [f'{s}->{r}' + (f'.{i}' if i else '')
                   for s, r, i in zip(table['sender'], table['receiver'], table['input'])]
  return table, meta


def edge_formation_figure(data: WorkdirData | str | pathlib.Path, *,
                          runs: Sequence[int] | None = None, max_runs: int = 4,
                          max_edges: int = 12) -> Figure | None:
  """When each edge of the circuit forms, one panel per run.

  Each circuit edge (patching.json; the largest `max_edges` by final effect)
  is drawn as its path-patching effect on the logit difference divided by
  its effect at the last checkpoint (1 = the final strength), with its
  threshold-midpoint mark from phase_changes.csv (curve
  `patching/EDGE`); the task's headline loss on a second axis and its phase
  change as a vertical line.
  """
  data = _as_data(data)
  table, meta = _patching_tables(data)
  if table is None:
    return _skip('edge formation', f'no {files.PATCHING_CSV} (`icldyn patch` writes it)')
  circuits = {int(k): v for k, v in meta.get('circuits', {}).items()}
  all_runs = sorted(int(r) for r in table['run'].unique())
  runs = [r for r in (runs if runs is not None else all_runs) if r in all_runs][:max_runs]
  if not runs:
    return _skip('edge formation', 'no runs')
  headline = data.task.get('headline', '')
  evaluator, _, metric = headline.partition('/')
  est = files.HEADLINE_ESTIMATOR
  phases = data.phase_changes
  with _style():
    # Wide enough for each panel's edge legend right of it, clear of the curves.
    fig = _new_figure(6.4, 1.6 * len(runs) + 0.6)
    axes = fig.subplots(len(runs), 1, squeeze=False, sharex=True)[:, 0]
    for ax, run in zip(axes, runs):
      sub = table[table['run'] == run]
      last = sub[sub['step'] == sub['step'].max()].set_index('edge')['value']
      edges = [e for e in circuits.get(run, []) if e in last.index]
      edges = sorted(edges, key=lambda e: -abs(last[e]))[:max_edges]
      steps_all = np.sort(sub['step'].unique())
      log = _spans_decades(steps_all[steps_all > 0])
      for color, e in zip(_colors(len(edges)), edges):
        s = sub[sub['edge'] == e].sort_values('step')
        x, y = s['step'].to_numpy(float), s['value'].to_numpy(float) / last[e]
        ax.plot(x, y, color=color, label=e, gid='curve')
        if phases is not None and not phases.empty:
          t = phases[(phases['run'] == run) & (phases['curve'] == f'patching/{e}')
                     & (phases['estimator'] == est)]
          if len(t) and np.isfinite(float(t['midpoint'].iloc[0])):
            ax.plot([float(t['midpoint'].iloc[0])], [0.5], 'o', ms=3, color=color, gid='phase')
      ax.axhline(0.5, color='0.7', lw=0.5, ls=':', gid='ref')
      ax.set_ylabel('effect / final')
      _step_axis(ax, log)
      _row_title(ax, _run_title(data, run))
      if data.metrics is not None and evaluator:
        m = data.metrics[(data.metrics['run'] == run) & (data.metrics['evaluator'] == evaluator)
                         & (data.metrics['metric'] == metric)].sort_values('step')
        if len(m):
          tw = ax.twinx()
          tw.plot(pd.to_numeric(m['step']).to_numpy(float), pd.to_numeric(m['value']).to_numpy(float),
                  color='0.4', lw=0.8, ls='--', gid='curve')
          tw.set_ylabel(metric, color='0.4')
          tw.spines['right'].set_visible(True)
          if log:
            tw.set_xscale('log')
      if phases is not None and not phases.empty:
        t = phases[(phases['run'] == run) & (phases['curve'] == headline)
                   & (phases['estimator'] == est)]
        if len(t) and np.isfinite(float(t['midpoint'].iloc[0])):
          ax.axvline(float(t['midpoint'].iloc[0]), color='0.3', lw=0.6, gid='phase')
      # Right of the loss axis's label (the twin axis takes the right spine).
      ax.legend(loc='upper left', bbox_to_anchor=(1.16, 1.0), fontsize=5,
                ncol=2 if len(edges) > 6 else 1, frameon=False)
    axes[-1].set_xlabel(STEP_LABEL)
    fig.suptitle(f'Circuit edges forming ({meta.get("corruption", "")})\ndashed: {headline}; '
                 f'vertical: its {est} phase change; dots: half the final effect', fontsize=6)
  return fig


def patching_matrix_figure(data: WorkdirData | str | pathlib.Path, *, run: int = 0,
                           steps: Sequence[int] | None = None) -> Figure | None:
  """The path-patching matrix of one run at a few checkpoints (first, middle, last by default).

  Rows: senders; columns: each later head's q, k, v, then the logits. Cells:
  the effect on the logit difference (noising: negative where the path
  matters), on one colour scale centred on 0.
  """
  data = _as_data(data)
  table, meta = _patching_tables(data)
  if table is None:
    return _skip('patching matrix', f'no {files.PATCHING_CSV}')
  sub = table[(table['run'] == run) & ~table['sender'].isin(['clean', 'corrupted'])]
  if sub.empty:
    return _skip('patching matrix', f'no run {run}')
  all_steps = np.sort(sub['step'].unique())
  if steps is None:
    steps = sorted({int(all_steps[0]), int(all_steps[len(all_steps) // 2]), int(all_steps[-1])})
  steps = [s for s in steps if s in set(all_steps.tolist())]
  natural = lambda n: [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', n)]  # noqa: E731
  senders = sorted(sub['sender'].unique(), key=natural)
  cols = sorted({(r, i) for r, i in zip(sub['receiver'], sub['input']) if r != 'logits'},
                key=lambda c: (natural(c[0]), c[1])) + [('logits', '')]
  index = {c: j for j, c in enumerate(cols)}
  rows = {s: i for i, s in enumerate(senders)}
  mats = []
  for step in steps:
    m = np.full((len(senders), len(cols)), np.nan)
    s = sub[sub['step'] == step]
    for snd, r, i, v in zip(s['sender'], s['receiver'], s['input'], s['value']):
      m[rows[snd], index[(r, i)]] = v
    mats.append(m)
  lim = max(float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 0.0 for m in mats) or 1.0
  with _style():
    fig = _new_figure(min(9.0, 0.9 + 0.11 * len(cols) * len(steps)), 0.6 + 0.13 * len(senders) + 0.5)
    axes = fig.subplots(1, len(steps), squeeze=False, sharey=True)[0]
    for ax, step, m in zip(axes, steps, mats):
      im = ax.imshow(m, cmap='RdBu', vmin=-lim, vmax=lim, aspect='auto', interpolation='nearest')
      ax.set_title(f'{step:g} sequences', fontsize=6)
      ax.set_xticks(range(len(cols)))
      ax.set_xticklabels([f'{r}.{i}' if i else r for r, i in cols], rotation=90, fontsize=4)
      ax.set_yticks(range(len(senders)))
      ax.set_yticklabels(senders, fontsize=5)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label='Δ logit diff')
    fig.suptitle(f'Path patching, run {run} ({meta.get("corruption", "")}, sender → receiver.input)',
                 fontsize=6)
  return fig


def plot_patching(data: WorkdirData | str | pathlib.Path, out_dir: str | pathlib.Path,
                  formats: Sequence[str] = ('png',), dpi: int = DPI) -> Paths | None:
  """Writes `edge_formation` and `patching_matrix` (if `icldyn patch` has run)."""
  data = _as_data(data)
  paths: Paths = []
  fig = edge_formation_figure(data)
  if fig is not None:
    paths += _save(fig, out_dir, 'edge_formation', formats, dpi)
    fig = patching_matrix_figure(data)
    if fig is not None:
      paths += _save(fig, out_dir, 'patching_matrix', formats, dpi)
  return paths or None
