"""Tests for icldyn.plots, .report and .results on synthetic workdirs.

The workdirs are written here in the CSV formats of docs/interfaces.md, so
these tests pin the plotting side of that contract without training anything.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from icldyn import plots
from icldyn import report
from icldyn import results
from icldyn.tasks import fewshot

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# Low resolution keeps the suite fast; sizes are checked against it.
TEST_DPI = 60
STEPS = np.unique(np.round(np.geomspace(100, 200_000, 24))).astype(int)
HEADS = 2


def _write_csv(path: pathlib.Path, header, rows) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _onset(settings: dict) -> float:
  """Synthetic phase-change time: later with more classes, never if huge."""
  base = 2_000.0 * (settings.get('data.num_train_classes', 64) / 64) ** 1.2
  if settings.get('clamp.condition') == 'ablate':
    base *= 3
  return base * (1 + 0.1 * settings.get('seeds.init', 0))


def write_workdir(path: pathlib.Path, settings: list[dict], *,
                  analysis: bool = True,
                  evaluators: tuple[str, ...] | None = None,
                  facts: bool = True) -> pathlib.Path:
  """Writes a synthetic workdir with one run per entry of `settings`.

  Args:
    path: the workdir to create.
    settings: per-run settings (dotted names), one dict per run.
    analysis: whether to write analysis/ (progress, phase changes, summary).
    evaluators: log only these evaluators; all by default.
    facts: write the few-shot task's facts into config.json, as `icldyn
      train` does (False: a workdir from before they were recorded).
  """
  path.mkdir(parents=True, exist_ok=True)
  names = list(settings[0])
  config = {'grid': names}
  if facts:
    config['task'] = fewshot.TASK.facts()
  (path / 'config.json').write_text(json.dumps(config))
  _write_csv(path / 'runs.csv',
             ['run', 'group', 'group_index'] + names + ['status',
                                                        'diverged_step'],
             [[r, 0, r] + [s[n] for n in names] + ['ok', '']
              for r, s in enumerate(settings)])
  metrics, progress, phase = [], [], []
  for r, s in enumerate(settings):
    t0 = _onset(s)
    sig = 1 / (1 + np.exp(-4 * (np.log(STEPS) - np.log(t0))))
    curves = {
        ('train', 'loss'): 1.2 * (1 - sig) + 0.05,
        ('train', 'grad_norm'): 1 + sig,
        ('fsl_train', 'loss'): 1.0 * (1 - sig) + 0.05,
        ('fsl_train', 'acc'): 0.5 + 0.5 * sig,
        ('fsl_val_rl', 'loss'): 1.1 * (1 - sig) + 0.1,
        ('fsl_val_rl', 'acc'): 0.5 + 0.45 * sig,
    }
    for h in range(HEADS):
      curves['fsl_train', f'induction_strength.h{h}'] = sig * (0.8 - 0.5 * h)
      curves['fsl_train', f'prev_token.h{h}'] = sig * (0.9 - 0.6 * h)
    for (ev, m), values in curves.items():
      if evaluators is not None and ev not in evaluators:
        continue
      metrics += [[step, r, ev, m, f'{v:.6g}']
                  for step, v in zip(STEPS, values)]
    for step, v in zip(STEPS[::4], sig[::4]):
      for h in range(HEADS):
        progress.append([step, r, 'induction_strength', 1, h, '', '', v])
        progress.append([step, r, 'prev_token', 0, h, '', '', v / 2])
        for h2 in range(HEADS):
          for m in ('k_composition', 'q_composition'):
            progress.append([step, r, m, 1, h, 0, h2, v * (h + h2 + 1) / 4])
    crossed = t0 < STEPS[-1] / 2
    phase.append([r] + [s[n] for n in names] + [
        'fsl_train/loss', 'threshold', t0 if crossed else '',
        t0 if crossed else '', t0 if crossed else '', crossed, ''])
  _write_csv(path / 'metrics.csv', ['step', 'run', 'evaluator', 'metric',
                                    'value'], metrics)
  if not analysis:
    return path
  _write_csv(path / 'analysis' / 'progress.csv',
             ['step', 'run', 'measure', 'layer', 'head', 'layer2', 'head2',
              'value'], progress)
  _write_csv(path / 'analysis' / 'phase_changes.csv',
             ['run'] + names + list(results.PHASE_COLUMNS), phase)
  _write_summary(path, names, phase)
  return path


def _write_summary(path: pathlib.Path, names: list[str], phase: list) -> None:
  """summary.csv aggregated over seeds the way the analysis module would."""
  keep = [i for i, n in enumerate(names) if n not in results.SEED_COLUMNS]
  groups: dict[tuple, list] = {}
  for row in phase:
    groups.setdefault(tuple(row[1 + i] for i in keep), []).append(row)
  rows = []
  for key, members in groups.items():
    times = [float(m[-5]) for m in members if m[-2]]
    mean = float(np.mean(times)) if times else math.nan
    std = float(np.std(times)) if times else math.nan
    rows.append(list(key) + ['fsl_train/loss', 'threshold', 'midpoint',
                             len(members), len(times), mean, std,
                             mean - std, mean + std])
  _write_csv(path / 'analysis' / 'summary.csv',
             [names[i] for i in keep] + list(results.SUMMARY_COLUMNS), rows)


def _seeds(i: int) -> dict:
  return {'seeds.init': i, 'seeds.data': i, 'seeds.eval': 0}


@pytest.fixture
def one_run(tmp_path):
  return write_workdir(tmp_path / 'one',
                       [{'data.num_train_classes': 64, **_seeds(0)}])


@pytest.fixture
def grid(tmp_path):
  """2 burstiness settings x 2 seeds."""
  settings = [{'data.num_train_classes': 64, 'data.burstiness': b,
               **_seeds(i)} for b, i in itertools.product((0, 2), (0, 1))]
  return write_workdir(tmp_path / 'grid', settings)


@pytest.fixture
def clamped(tmp_path):
  """3 class counts x 2 clamp conditions x 2 seeds; the largest with the
  clamp never crosses."""
  settings = [{'data.num_train_classes': k, 'clamp.condition': c, **_seeds(i)}
              for k, c, i in itertools.product((64, 256, 1024),
                                               ('none', 'ablate'), (0, 1))]
  return write_workdir(tmp_path / 'clamped', settings)


@pytest.fixture
def bare(tmp_path):
  """Training metrics only: no analysis/ and no checkpoints."""
  return write_workdir(tmp_path / 'bare', [{'data.num_train_classes': 64,
                                            **_seeds(0)}], analysis=False,
                       evaluators=('fsl_train',))


def png_size(path: pathlib.Path) -> tuple[int, int]:
  """(width, height) from a PNG's IHDR chunk, checking the signature."""
  head = path.read_bytes()[:24]
  assert head[:8] == PNG_MAGIC, f'{path} is not a PNG'
  assert head[12:16] == b'IHDR'
  return struct.unpack('>II', head[16:24])


def check_png(path: pathlib.Path, fig) -> None:
  # Agg truncates the figure's size in pixels to whole pixels.
  width, height = fig.get_size_inches() * TEST_DPI
  assert png_size(path) == (int(width), int(height))


def legend_texts(fig) -> list[str]:
  """Texts of every figure-level legend, subfigures' included."""
  legends = list(fig.legends)
  for sub in fig.subfigs:
    legends += sub.legends
  return [t.get_text() for legend in legends for t in legend.get_texts()]


def count(ax, gid: str) -> int:
  artists = list(ax.lines) + list(ax.collections)
  return sum(a.get_gid() == gid for a in artists)


# ----------------------------------------------------------------------------


def test_read_table_types(grid):
  data = results.load_workdir(grid)
  assert data.runs['run'].dtype == np.int64
  assert data.metrics['value'].dtype == np.float64
  assert data.phase_changes['crossed'].dtype == bool
  single = ~data.progress['measure'].str.endswith('_composition')
  assert data.progress['layer2'][single].isna().all()
  assert not data.progress['layer2'][~single].isna().any()
  assert data.varying_settings() == ['data.burstiness']
  groups = data.setting_groups()
  assert [g for _, g in groups] == [[0, 1], [2, 3]]
  assert groups[1][0] == {'data.burstiness': 2}


def test_series_keeps_last_write_of_a_step():
  table = pd.DataFrame({'step': [1, 2, 2, 3], 'run': [0, 0, 0, 0],
                        'value': [1.0, 2.0, 5.0, 3.0]})
  steps, values = results.series_by_run(table, {})[0]
  np.testing.assert_array_equal(steps, [1, 2, 3])
  np.testing.assert_array_equal(values, [1.0, 5.0, 3.0])


def test_phase_curves_one_run(one_run):
  fig = plots.phase_curves_figure(one_run)
  axes = fig.axes
  # train, fsl_train, fsl_val_rl; rows loss and acc (train logs no acc: no panel).
  assert len(axes) == 5
  loss_ax = axes[1]  # row-major: [loss train, loss fsl_train, ...]
  assert count(loss_ax, 'curve') == 1
  assert count(loss_ax, 'ref') == 2
  assert count(loss_ax, 'phase') == 1
  assert count(loss_ax, 'band') == 0
  assert loss_ax.get_xscale() == 'log'


def test_phase_curves_grid_averages_seeds(grid):
  fig = plots.phase_curves_figure(grid, evaluators=['fsl_train'])
  loss_ax, acc_ax = fig.axes
  assert count(loss_ax, 'curve') == 2
  assert count(loss_ax, 'band') == 2
  assert count(acc_ax, 'ref') == 0
  # Every run of the two settings crossed: one mark per run.
  assert count(loss_ax, 'phase') == 4
  assert fig.legends and 'burstiness=0 (n=2)' in [
      t.get_text() for t in fig.legends[0].get_texts()]
  fig = plots.phase_curves_figure(grid, evaluators=['fsl_train'], band=None)
  assert count(fig.axes[0], 'band') == 0


def test_progress_heads(grid):
  fig = plots.progress_heads_figure(grid)
  assert len(fig.axes) == 4 * 2  # 4 runs x (induction, prev-token)
  assert all(count(ax, 'head') == HEADS for ax in fig.axes)
  # Rows are named by what the grid varies, seeds included (runs 0-3 are
  # burstiness 0, 2 x init/data seeds 0, 1).
  assert [ax.get_title(loc='left') for ax in fig.axes[::2]] == [
      f'run {r}: burstiness={b}, init={i}, data={i}'
      for r, (b, i) in enumerate(itertools.product((0, 2), (0, 1)))]
  fig = plots.progress_heads_figure(grid, average=True, max_rows=1)
  assert len(fig.axes) == 2
  assert fig.legends[0].get_texts()[-1].get_text() == 'showing 1 of 2 settings'
  fig = plots.progress_heads_figure(grid, source='progress')
  assert all(count(ax, 'head') == HEADS for ax in fig.axes)


def test_timing_vs_data_clamp(clamped, tmp_path):
  fig = plots.timing_vs_data_figure(clamped)
  (ax,) = fig.axes
  assert ax.get_xlabel() == 'num_train_classes'
  assert count(ax, 'timing') == 2  # one line per clamp condition
  # Only (1024, ablate) never crosses: one open marker at the top.
  (never,) = [l for l in ax.lines if l.get_gid() == 'not_crossed']
  assert len(never.get_xdata()) == 1
  assert 'never crossed (at top)' in legend_texts(fig)
  assert 'condition=ablate' in legend_texts(fig)
  (path,) = plots.plot_timing_vs_data(clamped, tmp_path, formats=('pdf',))
  assert path.name == 'timing_vs_data.pdf'
  assert path.read_bytes()[:5] == b'%PDF-'


def test_timing_two_data_axes(tmp_path):
  settings = [{'data.num_train_classes': k, 'data.burstiness': b, **_seeds(0)}
              for k, b in itertools.product((64, 256, 1024), (0, 2))]
  fig = plots.timing_vs_data_figure(write_workdir(tmp_path / 'w', settings))
  assert [ax.get_xlabel() for ax in fig.axes] == ['num_train_classes',
                                                  'burstiness']
  # Each panel draws one line per value of the other axis, each with one
  # point per value of its own axis.
  for ax, n_lines, n_x in zip(fig.axes, (2, 3), (3, 2)):
    lines = [l for l in ax.lines if l.get_gid() in ('timing', 'not_crossed')]
    timing = [l for l in lines if l.get_gid() == 'timing']
    assert len(timing) == n_lines
    xs = [x for l in lines for x in l.get_xdata()]
    assert len(xs) == n_lines * n_x and len(set(xs)) == n_x
  assert 'burstiness=2' in legend_texts(fig)
  assert 'num_train_classes=1024' in legend_texts(fig)


def test_timing_from_phase_changes_matches_summary(clamped):
  data = results.load_workdir(clamped)
  from_summary = plots.timing_vs_data_figure(data)
  data.summary = None
  from_runs = plots.timing_vs_data_figure(data)
  lines = [[l for l in f.axes[0].lines if l.get_gid() == 'timing']
           for f in (from_summary, from_runs)]
  for a, b in zip(*lines):
    np.testing.assert_allclose(a.get_ydata(), b.get_ydata())


def test_timing_skips_without_a_data_axis(one_run, caplog):
  with caplog.at_level(logging.INFO):
    assert plots.timing_vs_data_figure(one_run) is None
  assert 'no data setting varies' in caplog.text


def test_composition(grid):
  fig = plots.composition_figure(grid, average=True)
  # 2 settings x (q, k) composition; 4 head pairs each.
  assert len(fig.axes) == 4
  assert fig.axes[0].get_ylabel() == 'q composition'
  assert all(count(ax, 'pair') == HEADS * HEADS for ax in fig.axes)
  fig = plots.composition_figure(grid, highlight=2, max_rows=1)
  assert [t.get_text() for t in fig.legends[0].get_texts()][-2:] == [
      'other pairs (2)', 'showing 1 of 4 runs']


def attention_arrays(runs=2, steps=3, examples=2, layers=2, heads=3, t=5):
  """Random causal patterns in the layout of analysis/attention_patterns.npz."""
  rng = np.random.default_rng(0)
  shape = (runs, steps, 1 + examples, layers, heads, t, t)
  logits = np.where(np.tril(np.ones((t, t), bool)), rng.normal(size=shape), -np.inf)
  p = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
  labels = np.array([[[f'x1', f'y1={e}', 'x2', f'y2={e + 1}', 'q'] for e in range(examples)]
                     for _ in range(runs)])
  return {'runs': np.arange(runs), 'run_labels': np.array([f'seed={r}' for r in range(runs)]),
          'steps': np.arange(steps) * 1000, 'mean': p[:, :, 0], 'examples': p[:, :, 1:],
          'example_labels': labels, 'position_labels': np.array(['x1', 'y1', 'x2', 'y2', 'q']),
          'prev_head': np.array([2, 0]), 'induction_head': np.array([1, 2])}


def test_attention_patterns_draw_the_arrays_with_token_labels(tmp_path):
  a = attention_arrays()
  fig = plots.attention_patterns_figure(a, max_rows=4)
  axes = [ax for ax in fig.axes if ax.images]
  per_row = 2 * (1 + 2) + 1  # (mean + 2 sequences) x 2 heads, then the query row of every head
  assert len(axes) == 4 * per_row  # 2 runs x 3 steps, capped at 4 rows
  # Row 1 is run 0 at step 1: its prev-token head is 2 (layer 0), induction head 1 (layer 1).
  row = axes[per_row:2 * per_row]
  np.testing.assert_array_equal(row[0].images[0].get_array(), a['mean'][0, 1, 0, 2])
  np.testing.assert_array_equal(row[2].images[0].get_array(), a['examples'][0, 1, 1, 0, 2])
  np.testing.assert_array_equal(row[3].images[0].get_array(), a['mean'][0, 1, 1, 1])
  np.testing.assert_array_equal(row[6].images[0].get_array(), a['mean'][0, 1, 1, :, -1, :])
  assert [t.get_text() for t in row[0].get_xticklabels()] == ['x1', 'y1', 'x2', 'y2', 'q']
  assert [t.get_text() for t in row[2].get_yticklabels()] == ['x1', 'y1=1', 'x2', 'y2=2', 'q']
  assert 'L0 H2 (prev-token), mean' == row[0].get_title()
  assert '1,000' in row[0].get_ylabel() and 'seed=0' in row[0].get_ylabel()
  with pytest.raises(ValueError, match="lack \\['steps'\\]"):
    plots.attention_patterns_figure({k: v for k, v in a.items() if k != 'steps'})
  assert plots.plot_attention_patterns(None, tmp_path) is None


def test_make_all_and_report(tmp_path):
  # One evaluator keeps the figures, and so the test, small.
  one_run = write_workdir(tmp_path / 'w', [{'data.num_train_classes': 64,
                                            **_seeds(0)}],
                          evaluators=('fsl_train',))
  attention = attention_arrays(runs=1, steps=3)
  np.savez(one_run / plots.ATTENTION_FILE, **attention)
  paths = plots.make_all(one_run, dpi=TEST_DPI)
  # Figures with make_all's defaults, to know each PNG's size. One run
  # sweeps no data setting, so there is no timing figure.
  figures = {
      'phase_curves': plots.phase_curves_figure(one_run),
      'progress_heads': plots.progress_heads_figure(one_run),
      'composition': plots.composition_figure(one_run),
      'attention_patterns': plots.attention_patterns_figure(attention),
  }
  assert [p.name for p in paths] == [f'{k}.png' for k in figures]
  for path, fig in zip(paths, figures.values()):
    assert path.parent == one_run / 'plots'
    check_png(path, fig)
  out = report.write_report(one_run)
  text = out.read_text()
  assert out == one_run / 'report.md'
  for name in figures:
    assert f'![{name}](plots/{name}.png)' in text
  assert text.index('phase_curves.png') < text.index('attention_patterns.png')


def test_timing_png(clamped, tmp_path):
  (path,) = plots.plot_timing_vs_data(clamped, tmp_path, dpi=TEST_DPI)
  check_png(path, plots.timing_vs_data_figure(clamped))


def test_report_per_setting(clamped):
  text = report.write_report(clamped).read_text()
  # Per-setting table: 6 settings, the (1024, ablate) one not crossed.
  timing = text.split('## Phase-change times')[1].split('## Figures')[0]
  table = [l for l in timing.splitlines() if l.startswith('| ')]
  assert len(table) == 1 + 6
  assert sum(report.NOT_CROSSED in l for l in table) == 1
  assert '`condition`' in table[0] and '`num_train_classes`' in table[0]
  assert '| 64 | none | 2/2 |' in text


def test_report_per_run_without_summary(clamped):
  (clamped / 'analysis' / 'summary.csv').unlink()
  text = report.write_report(clamped).read_text()
  timing = text.split('## Phase-change times')[1].split('## Figures')[0]
  table = [l for l in timing.splitlines() if l.startswith('| ')]
  assert len(table) == 1 + 12
  assert sum(report.NOT_CROSSED in l for l in table) == 2
  assert 'No figures' in text


def test_bare_workdir_skips_with_notes(bare, caplog):
  with caplog.at_level(logging.INFO):
    paths = plots.make_all(bare, dpi=TEST_DPI)
  # Curves and per-head scores come from metrics.csv alone.
  assert sorted(p.name for p in paths) == ['phase_curves.png',
                                           'progress_heads.png']
  for figure in ('timing vs data', 'composition', 'attention patterns'):
    assert f'Skipping {figure}' in caplog.text
  fig = plots.phase_curves_figure(bare)
  assert len(fig.axes) == 2
  assert count(fig.axes[0], 'phase') == 0
  text = report.write_report(bare).read_text()
  assert 'No phase-change results' in text


def test_empty_workdir(tmp_path, caplog):
  with caplog.at_level(logging.INFO):
    assert plots.make_all(tmp_path / 'missing') == []
  assert 'Skipping phase curves: no metrics.csv' in caplog.text
  assert not (tmp_path / 'missing' / 'plots').exists()


def test_never_imports_jax():
  code = ('import sys; import icldyn.plots, icldyn.report, icldyn.results; '
          'bad = sorted(m for m in sys.modules if m == "jax" or '
          'm.startswith(("jax.", "jaxlib", "flax", "optax", "orbax"))); '
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True,
                 timeout=60)


def test_workdir_without_task_facts_reads_them_from_its_tables(tmp_path):
  # A workdir from before config.json recorded the task's facts: the headline
  # is its first timed curve, the induction metric the per-head metric that is
  # not prev_token, the data axes its varying data settings; no reference lines.
  settings = [{'data.num_train_classes': k, **_seeds(i)} for k, i in
              itertools.product((64, 256), (0, 1))]
  old = results.load_workdir(write_workdir(tmp_path / 'old', settings, facts=False))
  task = old.task
  assert task['headline'] == 'fsl_train/loss'
  assert task['induction_metric'] == 'induction_strength'
  assert task['data_axes'] == ['data.num_train_classes']
  assert task['references'] == {}
  fig = plots.progress_heads_figure(old)
  assert fig is not None and len(fig.axes) >= 2
  fig = plots.timing_vs_data_figure(old)
  assert fig is not None
  assert fig.axes[0].get_xlabel().endswith('num_train_classes')
  fig = plots.phase_curves_figure(old)
  assert not [l for ax in fig.axes for l in ax.lines if l.get_gid() == 'ref']


# ----------------------------------------------------------------------------
# The values drawn are the tables' values (read back from the artists and
# compared with the CSV files parsed here with the csv module).


def _csv(path: pathlib.Path) -> list[dict]:
  with path.open(newline='') as f:
    return list(csv.DictReader(f))


def _series(wd: pathlib.Path, run: int, evaluator: str, metric: str):
  rows = [r for r in _csv(wd / 'metrics.csv') if int(r['run']) == run
          and r['evaluator'] == evaluator and r['metric'] == metric]
  return (np.array([int(r['step']) for r in rows]),
          np.array([float(r['value']) for r in rows]))


def _gid(ax, gid: str) -> list:
  return [a for a in list(ax.lines) + list(ax.collections) if a.get_gid() == gid]


def test_phase_curves_draw_the_metrics_and_the_phase_changes(one_run):
  fig = plots.phase_curves_figure(one_run)
  titles = [ax.get_title() for ax in fig.axes[:3]]
  # Rows loss, acc; columns by evaluator (titles on the first row).
  # train logs no accuracy, so the acc row has panels for the other two only.
  panels = {('loss', t): ax for t, ax in zip(titles, fig.axes[:3])}
  panels.update({('acc', t): ax for t, ax in zip(titles[1:], fig.axes[3:])})
  for evaluator, metric in (('fsl_train', 'loss'), ('fsl_val_rl', 'acc')):
    (line,) = _gid(panels[(metric, evaluator)], 'curve')
    steps, values = _series(one_run, 0, evaluator, metric)
    np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_allclose(line.get_ydata(), values, rtol=1e-12)
  # The dashed mark: the run's midpoint in phase_changes.csv.
  (row,) = _csv(one_run / 'analysis' / 'phase_changes.csv')
  (mark,) = _gid(fig.axes[titles.index('fsl_train')], 'phase')
  assert list(mark.get_xdata()) == [float(row['midpoint'])] * 2
  # The reference lines of the loss: ln 2 and 0.4 ln 2.
  refs = sorted(l.get_ydata()[0] for l in _gid(fig.axes[1], 'ref'))
  np.testing.assert_allclose(refs, [0.4 * math.log(2), math.log(2)])


def test_phase_curves_draw_the_seed_mean_and_its_band(grid):
  fig = plots.phase_curves_figure(grid, evaluators=['fsl_train'])
  loss_ax = fig.axes[0]
  curves, bands = _gid(loss_ax, 'curve'), _gid(loss_ax, 'band')
  for runs, line, band in zip(([0, 1], [2, 3]), curves, bands):
    stacked = np.stack([_series(grid, r, 'fsl_train', 'loss')[1] for r in runs])
    steps = _series(grid, runs[0], 'fsl_train', 'loss')[0]
    np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_allclose(line.get_ydata(), stacked.mean(0), rtol=1e-12)
    # fill_between's polygon runs along the lower edge and back along the upper.
    ys = band.get_paths()[0].vertices[:, 1]
    np.testing.assert_allclose(ys.min(), stacked.min(), rtol=1e-12)
    np.testing.assert_allclose(ys.max(), stacked.max(), rtol=1e-12)
    for want in (stacked.min(0), stacked.max(0)):
      assert all(np.isclose(ys, w, rtol=1e-12).any() for w in want)


def test_progress_heads_draw_each_heads_metric(grid):
  fig = plots.progress_heads_figure(grid)
  rows = fig.axes
  for run in range(4):
    ind_ax = rows[2 * run]
    heads = _gid(ind_ax, 'head')
    assert len(heads) == HEADS
    drawn = sorted((tuple(l.get_ydata()) for l in heads))
    want = sorted(tuple(_series(grid, run, 'fsl_train', f'induction_strength.h{h}')[1])
                  for h in range(HEADS))
    np.testing.assert_allclose(np.array(drawn), np.array(want), rtol=1e-12)


def test_timing_vs_data_draws_the_summary_means(clamped):
  fig = plots.timing_vs_data_figure(clamped)
  (ax,) = fig.axes
  summary = _csv(clamped / 'analysis' / 'summary.csv')
  lines = _gid(ax, 'timing')
  assert len(lines) == 2
  drawn = set()
  for line in lines:
    drawn |= set(zip(line.get_xdata().tolist(), line.get_ydata().tolist()))
  want = {(float(r['data.num_train_classes']), float(r['mean'])) for r in summary
          if r['mean'] not in ('', 'nan')}
  assert drawn == want and len(want) == 5  # (1024, ablate) never crossed: not a point


def test_edge_formation_draws_each_edge_over_its_final_effect(grid):
  # Two circuit edges of run 1 with known curves: each is drawn as its
  # patching.csv value divided by its value at the last checkpoint, the
  # larger final effect first; the row is named by the run's settings.
  steps = [100, 200, 300, 400]
  effects = {('L0H0', 'L1H2', 'k'): [0.1, 0.5, 2.0, 4.0],
             ('L1H2', 'logits', ''): [-0.2, -0.5, -1.0, -1.0]}
  rows = [[s, 1, snd, rcv, inp, 'logit_diff', v[i]]
          for (snd, rcv, inp), v in effects.items() for i, s in enumerate(steps)]
  rows += [[s, 1, 'L0H0', 'L1H2', 'k', 'loss', 9.0] for s in steps]  # another metric: not drawn
  _write_csv(grid / 'analysis' / 'patching.csv',
             ['step', 'run', 'sender', 'receiver', 'input', 'metric', 'value'], rows)
  (grid / 'analysis' / 'patching.json').write_text(json.dumps(
      {'metric': 'logit_diff', 'corruption': 'permute_labels',
       'circuits': {'1': ['L0H0->L1H2.k', 'L1H2->logits']}}))
  fig = plots.edge_formation_figure(grid, runs=[1])
  ax = fig.axes[0]
  assert ax.get_title(loc='left') == 'run 1: burstiness=0, init=1, data=1'
  lines = _gid(ax, 'curve')
  assert [line.get_label() for line in lines] == ['L0H0->L1H2.k', 'L1H2->logits']
  for line, v in zip(lines, effects.values()):
    np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_allclose(line.get_ydata(), np.array(v) / v[-1], rtol=1e-12)
