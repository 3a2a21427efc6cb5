"""Tests for icldyn.analysis.summary: across-seed means and bootstrap CIs."""

import math

import numpy as np
import pytest

from icldyn.analysis import summary


def _rows():
  """Two settings of `lr` (as CSV strings), four seeds each."""
  rows = []
  for lr, times, crossed in [
      ('0.1', [100.0, 200.0, 300.0, 999.0], ['True', 'True', 'True', 'False']),
      ('0.01', [50.0, '', 70.0, 80.0], ['True', 'True', 'False', 'False']),
  ]:
    for seed, (t, c) in enumerate(zip(times, crossed)):
      rows.append({'lr': lr, 'seed': seed, 'midpoint': t, 'crossed': c})
  return rows


def test_groups_counts_and_moments():
  out = summary.summarise(_rows(), ['lr'], 'midpoint', 'crossed', n_boot=200)
  assert [r['lr'] for r in out] == ['0.1', '0.01']  # first-appearance order
  a, b = out
  assert (a['n_seeds'], a['n_crossed']) == (4, 3)
  # Only crossed runs are averaged: the 999 of the non-crossed seed is not.
  assert a['mean'] == pytest.approx(200.0)
  assert a['std'] == pytest.approx(np.std([100, 200, 300], ddof=1))
  # Crossed but without a value ('') counts as crossed, not as a value: one
  # value left, so std and CI are undefined.
  assert (b['n_seeds'], b['n_crossed']) == (4, 2)
  assert b['mean'] == 50.0
  assert math.isnan(b['std']) and math.isnan(b['ci_low'])
  assert math.isnan(b['ci_high'])


def test_no_crossed_runs_gives_nan():
  rows = [{'g': 1, 'v': 5.0, 'c': False}, {'g': 1, 'v': 6.0, 'c': 0}]
  (r,) = summary.summarise(rows, ['g'], 'v', 'c')
  assert (r['n_seeds'], r['n_crossed']) == (2, 0)
  assert all(math.isnan(r[k]) for k in ('mean', 'std', 'ci_low', 'ci_high'))


def test_several_group_keys():
  rows = [{'a': a, 'b': b, 'v': float(a + b + s), 'c': True}
          for a in (0, 1) for b in (0, 1) for s in range(3)]
  out = summary.summarise(rows, ['a', 'b'], 'v', 'c', n_boot=100)
  assert [(r['a'], r['b']) for r in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  np.testing.assert_allclose([r['mean'] for r in out], [1.0, 2.0, 2.0, 3.0])


def test_ci_matches_independent_bootstrap_and_is_deterministic():
  values = np.random.default_rng(7).exponential(3.0, size=12)
  rows = [{'g': 'x', 'v': v, 'c': 'True'} for v in values]
  (r,) = summary.summarise(rows, ['g'], 'v', 'c', n_boot=500, seed=3)
  # The documented procedure, written out with numpy.
  rng = np.random.default_rng(3)
  means = np.array([values[rng.integers(0, 12, size=12)].mean()
                    for _ in range(500)])
  np.testing.assert_allclose([r['ci_low'], r['ci_high']],
                             np.percentile(means, [2.5, 97.5]), rtol=1e-12)
  again = summary.summarise(rows, ['g'], 'v', 'c', n_boot=500, seed=3)
  assert again == [r]
  other = summary.summarise(rows, ['g'], 'v', 'c', n_boot=500, seed=4)[0]
  assert other['ci_low'] != r['ci_low']


def test_ci_covers_the_true_mean_at_about_95_percent():
  # 200 samples of 20 from N(5, 1). A percentile bootstrap CI of the mean
  # covers ~93% at n = 20 (it is slightly narrow); binomial sd of the
  # coverage over 200 samples is 0.018, so [0.87, 0.99] is ~3 sd either
  # way. A CI built from the sample sd instead of the standard error would
  # cover 100%; one from a single resample, far less.
  rng = np.random.default_rng(0)
  hits = 0
  for i in range(200):
    sample = rng.normal(5.0, 1.0, size=20)
    lo, hi = summary.bootstrap_mean_ci(sample, n_boot=1000, seed=i)
    hits += lo <= 5.0 <= hi
  assert 0.87 <= hits / 200 <= 0.99


def test_bad_crossed_flag_raises():
  with pytest.raises(ValueError):
    summary.summarise([{'v': 1.0, 'c': 'maybe'}], [], 'v', 'c')
