"""Tests for icldyn.analysis.timing: the phase-change timing estimators."""

import math

import numpy as np
import pytest
import scipy.special

from icldyn.analysis import timing

LO, AMP = 0.05, 0.65   # a loss falling from 0.70 to 0.05
NOISE = 0.02


def _sigmoid(t, t0, k):
  """Falling logistic `LO + AMP / (1 + exp(k (t - t0)))`."""
  return LO + AMP * scipy.special.expit(-k * (t - t0))


def _log_curve(seed, mid=1e5, k=5.0, n=81):
  """Noisy sigmoid in log time on log-spaced steps 1e3 .. 1e7."""
  x = np.geomspace(1e3, 1e7, n)
  rng = np.random.default_rng(seed)
  return x, _sigmoid(np.log(x), math.log(mid), k) + rng.normal(0, NOISE, n)


def _lin_curve(seed, mid=8e5, width=1e5, n=81):
  """Noisy sigmoid in linear time on steps 0 .. 2e6 (step 0 included)."""
  x = np.linspace(0, 2e6, n)
  rng = np.random.default_rng(seed)
  return x, _sigmoid(x / width, mid / width, 1.0) + rng.normal(0, NOISE, n)


# --- threshold_crossing -------------------------------------------------------


def test_threshold_interpolation_is_exact_on_piecewise_linear():
  x = np.array([0.0, 10.0, 20.0, 30.0])
  y = np.array([1.0, 0.8, 0.2, 0.1])
  t = timing.threshold_crossing(x, y, level=0.5)
  # The segment from (10, 0.8) to (20, 0.2) reaches 0.5 half-way.
  assert t.crossed and t.midpoint == pytest.approx(15.0, abs=1e-12)
  assert math.isnan(t.onset) and math.isnan(t.end) and math.isnan(t.fit_r2)
  # A rising curve, crossing 0.65 a quarter of the way from 10 to 20.
  t = timing.threshold_crossing(x, 1 - y, level=0.35, direction='up')
  assert t.crossed and t.midpoint == pytest.approx(12.5, abs=1e-12)


def test_threshold_drops_nan_and_interpolates_across_the_gap():
  x = np.array([0.0, 10.0, 20.0])
  y = np.array([1.0, np.nan, 0.0])
  t = timing.threshold_crossing(x, y, level=0.25)
  assert t.midpoint == pytest.approx(15.0)


def test_unsorted_and_repeated_steps_are_sorted_and_averaged():
  x = np.array([20.0, 0.0, 10.0, 10.0])
  y = np.array([0.2, 1.0, 0.7, 0.9])   # step 10 averages to 0.8
  t = timing.threshold_crossing(x, y, level=0.5)
  assert t.midpoint == pytest.approx(15.0, abs=1e-12)


def test_threshold_never_crossed_and_already_below():
  x = np.arange(5.0)
  never = timing.threshold_crossing(x, np.full(5, 0.7), level=0.3)
  assert not never.crossed and math.isnan(never.midpoint)
  # Already below at the first evaluation: crossed, time is the first step.
  early = timing.threshold_crossing(x + 100, np.full(5, 0.1), level=0.3)
  assert early.crossed and early.midpoint == 100.0
  empty = timing.threshold_crossing(x, np.full(5, np.nan))
  assert not empty.crossed and math.isnan(empty.midpoint)


@pytest.mark.parametrize('seed', range(5))
def test_threshold_recovers_sigmoid_level_crossing(seed):
  x, y = _log_curve(seed)
  level = 0.4 * math.log(2)
  # Noise-free crossing: expit(-k (t - t0)) = p  <=>  t = t0 - logit(p) / k.
  p = (level - LO) / AMP
  true_t = math.log(1e5) - scipy.special.logit(p) / 5.0
  t = timing.threshold_crossing(x, y)
  # Near the level the curve falls 5 * 0.65 * p(1-p) = 0.74 per unit log step,
  # so noise of 0.02 moves one crossing by ~0.03; the first of several noisy
  # crossings is biased early by a few of those. 0.15 is about 5 of them.
  assert t.crossed and abs(math.log(t.midpoint) - true_t) < 0.15


# --- logistic_fit ------------------------------------------------------------


@pytest.mark.parametrize('seed', range(5))
def test_logistic_recovers_log_time_midpoint(seed):
  x, y = _log_curve(seed)
  t = timing.logistic_fit(x, y)
  # About 8 evaluations lie in the transition, where dy/dt0 is up to
  # 0.65 * 5 / 4 = 0.8 per log step: the standard error of t0 is about
  # 0.02 / (0.8 * sqrt(8) * 0.7) = 0.013 log steps; 0.05 is ~4 of them.
  assert t.crossed and abs(math.log(t.midpoint / 1e5)) < 0.05
  # 10% / 90% points of the true curve are t0 -/+ ln(9) / k; their error adds
  # the error of the fitted slope, so allow three times as much.
  assert abs(math.log(t.onset) - (math.log(1e5) - math.log(9) / 5)) < 0.15
  assert abs(math.log(t.end) - (math.log(1e5) + math.log(9) / 5)) < 0.15
  assert t.fit_r2 > 0.95


@pytest.mark.parametrize('seed', range(5))
def test_logistic_recovers_linear_time_midpoint(seed):
  x, y = _lin_curve(seed)
  t = timing.logistic_fit(x, y, log_time=False)
  # ~17 evaluations in the transition, dy/dt0 up to 0.65 / 4e5 per step:
  # standard error ~ 0.02 / (1.6e-6 * sqrt(17) * 0.7) = 4e3 steps; allow 2e4
  # (~5 standard errors, under one grid spacing of 2.5e4).
  assert t.crossed and abs(t.midpoint - 8e5) < 2e4
  # 10% / 90% points at 8e5 -/+ ln(9) * 1e5 = 8e5 -/+ 2.2e5.
  assert abs(t.onset - (8e5 - math.log(9) * 1e5)) < 5e4
  assert abs(t.end - (8e5 + math.log(9) * 1e5)) < 5e4


def test_logistic_rising_curve():
  x, y = _log_curve(0)
  t = timing.logistic_fit(x, 1 - y, direction='up')
  assert t.crossed and abs(math.log(t.midpoint / 1e5)) < 0.05
  # Fitting a rising curve as a falling one finds no drop.
  assert not timing.logistic_fit(x, 1 - y, direction='down').crossed


# --- steepest_descent --------------------------------------------------------


@pytest.mark.parametrize('seed', range(5))
def test_steepest_recovers_log_time_midpoint(seed):
  x, y = _log_curve(seed)
  t = timing.steepest_descent(x, y)
  # Evaluations are 0.115 log steps apart; over 300 seeds the error of the
  # slope peak of a 5-point average has sd 0.05 and max 0.18. 0.25 is two
  # spacings.
  assert t.crossed and abs(math.log(t.midpoint / 1e5)) < 0.25
  assert t.onset < t.midpoint < t.end
  # Half-peak slope of a logistic is at t0 -/+ ln(3 + 2 sqrt 2) / k = 0.35;
  # smoothing and noise widen it, so only bracket it loosely.
  assert 0.2 < math.log(t.midpoint / t.onset) < 0.8
  assert 0.2 < math.log(t.end / t.midpoint) < 0.8


@pytest.mark.parametrize('seed', range(5))
def test_steepest_linear_time_and_rising(seed):
  # A transition as many evaluations wide as the log-time one (10%-90% over
  # ~9 spacings). Over 300 seeds the midpoint error has sd 1.4e4 and max
  # 4e4; 5e4 is two grid spacings.
  x, y = _lin_curve(seed, width=5e4)
  t = timing.steepest_descent(x, y, log_time=False)
  assert t.crossed and abs(t.midpoint - 8e5) < 5e4
  t = timing.steepest_descent(x, 1 - y, log_time=False, direction='up')
  assert t.crossed and abs(t.midpoint - 8e5) < 5e4


# --- no transition ------------------------------------------------------------


def _assert_not_crossed(t):
  assert not t.crossed
  assert math.isnan(t.onset) and math.isnan(t.midpoint) and math.isnan(t.end)


@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('sigma', [0.05, 0.2])
def test_noisy_flat_curve_is_not_crossed(seed, sigma):
  # Noise up to twice `min_drop`: a rule on the extreme drop of the smoothed
  # curve alone would call a third of these curves crossed.
  x = np.geomspace(1e3, 1e7, 81)
  y = 0.69 + np.random.default_rng(seed).normal(0, sigma, x.size)
  # The threshold rule has no noise protection (one evaluation below the
  # level counts), so it is only asked to stay quiet at the low noise level.
  names = ('logistic', 'steepest') + (('threshold',) if sigma < 0.1 else ())
  for t in timing.time_all(x, y, estimators=names).values():
    _assert_not_crossed(t)
  for t in timing.time_all(x, np.full(x.size, 0.69)).values():
    _assert_not_crossed(t)


def test_transition_beyond_the_data_is_not_crossed():
  # Midpoint at 1e8, past the last evaluation (1e7): the curve has only begun
  # to fall, and no estimator may place a midpoint.
  x, y = _log_curve(0, mid=1e8, k=2.0)
  _assert_not_crossed(timing.logistic_fit(x, y))
  _assert_not_crossed(timing.steepest_descent(x, y))


def test_short_and_nan_curves():
  x = np.array([1e3, 1e4, 1e5])
  y = np.array([0.7, 0.4, 0.05])
  _assert_not_crossed(timing.logistic_fit(x, y))
  _assert_not_crossed(timing.steepest_descent(x, y))
  # NaNs are dropped, not propagated: the fit still finds the midpoint.
  xs, ys = _log_curve(1)
  ys[::4] = np.nan
  t = timing.logistic_fit(xs, ys)
  assert t.crossed and abs(math.log(t.midpoint / 1e5)) < 0.08


# --- drivers ------------------------------------------------------------------


def test_time_all_routes_keywords():
  x, y = _log_curve(0)
  out = timing.time_all(x, 1 - y, direction='up', level=0.5)
  assert list(out) == ['threshold', 'logistic', 'steepest']
  assert all(t.crossed for t in out.values())
  with pytest.raises(ValueError):
    timing.time_all(x, y, levle=0.5)
  with pytest.raises(ValueError):
    timing.time_all(x, y, estimators=('threshold',), log_time=True)


def test_time_curves_batches_rows():
  x, y0 = _log_curve(0)
  _, y1 = _log_curve(1, mid=1e6)
  Y = np.stack([y0, y1, np.full_like(y0, 0.69)])
  out = timing.time_curves(x, Y, estimators=('logistic', 'steepest'))
  for name in ('logistic', 'steepest'):
    f = out[name]
    assert f['midpoint'].shape == (3,) and f['crossed'].dtype == bool
    np.testing.assert_array_equal(f['crossed'], [True, True, False])
    assert math.isnan(f['midpoint'][2])
  np.testing.assert_allclose(np.log(out['logistic']['midpoint'][:2]),
                             np.log([1e5, 1e6]), atol=0.05)
