"""Phase-change timing estimators for one metric curve.

This module owns the question "when did this curve make its transition?" for a
curve `y[n]` evaluated at training steps `x[n]` (training sequences seen,
ascending). It is array-in / array-out (numpy and scipy, no JAX, no I/O); the
CLI that reads `metrics.csv` and writes `phase_changes.csv` lives elsewhere.

Three estimators of the same event, which disagree in informative ways
(Singh et al. 2024, "What needs to go right for an induction head?",
arXiv:2404.07129, time phase changes from loss and progress-measure curves):

* `threshold_crossing`: first step where the curve crosses a fixed level.
* `logistic_fit`: a four-parameter logistic in log (or linear) time.
* `steepest_descent`: the step of steepest slope of a smoothed curve.

Each returns a `Timing`. The rule throughout: when the transition was not
observed, `crossed` is False and every time is NaN -- an estimator never
invents a time.

Every estimator drops evaluations whose `y` (or `x`) is not finite, and in
log time those with `x <= 0`, and averages repeated steps, before it does
anything else.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
import scipy.optimize
import scipy.special

__all__ = [
    'Timing',
    'NOT_CROSSED',
    'threshold_crossing',
    'logistic_fit',
    'steepest_descent',
    'ESTIMATORS',
    'time_all',
    'time_curves',
]


@dataclasses.dataclass(frozen=True)
class Timing:
  """When a transition happened, in steps (training sequences seen).

  Attributes:
    onset: step where the transition starts; NaN where the estimator has no
      notion of onset or the transition was not observed.
    midpoint: step of the transition's centre; NaN when not observed.
    end: step where the transition ends; NaN as for `onset`.
    crossed: whether the estimator saw the transition happen.
    fit_r2: coefficient of determination of a fitted model (NaN for
      estimators that fit nothing).
  """

  onset: float = math.nan
  midpoint: float = math.nan
  end: float = math.nan
  crossed: bool = False
  fit_r2: float = math.nan


NOT_CROSSED = Timing()

# Fraction of the drop completed at onset / end for the logistic fit.
_ONSET_FRACTION = 0.1
_DIRECTIONS = ('down', 'up')


def _check_direction(direction: str) -> float:
  """Returns the sign that turns a `direction` curve into a falling one."""
  if direction not in _DIRECTIONS:
    raise ValueError(f"direction must be 'down' or 'up', got {direction!r}")
  return 1.0 if direction == 'down' else -1.0


def _clean(x, y, log_time: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Drops unusable evaluations and sorts by step.

  Args:
    x: `[n]` steps.
    y: `[n]` curve values.
    log_time: also drop `x <= 0`, which has no logarithm.

  Returns:
    `(x, y)`, both `[m]` float64 with `m <= n`, finite, `x` strictly
    ascending (values at a repeated step averaged).
  """
  x = np.asarray(x, dtype=np.float64).reshape(-1)
  y = np.asarray(y, dtype=np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f'x and y differ in shape: {x.shape} vs {y.shape}')
  keep = np.isfinite(x) & np.isfinite(y)
  if log_time:
    keep &= x > 0
  # Sorted unique steps: callers pass sorted steps, but a merged metrics file
  # need not be, and a step evaluated twice (e.g. after a resume) would leave
  # slopes undefined; its values are averaged.
  xu, inverse = np.unique(x[keep], return_inverse=True)
  yu = np.bincount(inverse, weights=y[keep]) / np.bincount(inverse)
  return xu, yu


def threshold_crossing(
    x, y, level: float = 0.4 * math.log(2.0), direction: str = 'down'
) -> Timing:
  """First step at which the curve reaches `level`.

  For `direction='down'` the crossing index is the first `i` with
  `y[i] <= level` ('up': `y[i] >= level`). For `i > 0` the step is linearly
  interpolated between the two evaluations around the crossing:
  `t = x[i-1] + (level - y[i-1]) * (x[i] - x[i-1]) / (y[i] - y[i-1])`.
  If the curve is already at or past `level` at its first evaluation, the
  transition happened before (or at) the first evaluation: `crossed=True`
  and `midpoint = x[0]`, an upper bound on the crossing time.

  The default level, `0.4 ln 2`, is 40% of the chance loss of a two-way
  choice: well below chance, so modest noise around chance does not trigger
  it. There is no other noise protection: a single evaluation past the level
  counts, so smooth a very noisy curve first.

  Args:
    x: `[n]` steps, ascending.
    y: `[n]` curve values; NaN evaluations are dropped.
    level: the threshold, in units of `y`.
    direction: 'down' for falling curves (losses), 'up' for rising ones
      (accuracy, induction strength).

  Returns:
    `Timing` with `midpoint` the crossing step; `onset`, `end`, `fit_r2` NaN.
    `crossed=False` (times NaN) when the curve never reaches `level` or has
    no finite evaluations.
  """
  sign = _check_direction(direction)
  x, y = _clean(x, y)
  if x.size == 0:
    return NOT_CROSSED
  # Work on a falling curve: flip a rising one and its level.
  y, level = sign * y, sign * level
  below = np.flatnonzero(y <= level)
  if below.size == 0:
    return NOT_CROSSED
  i = int(below[0])
  if i == 0:
    return Timing(midpoint=float(x[0]), crossed=True)
  # y[i-1] > level >= y[i], so the denominator is strictly negative.
  frac = (level - y[i - 1]) / (y[i] - y[i - 1])
  return Timing(midpoint=float(x[i - 1] + frac * (x[i] - x[i - 1])),
                crossed=True)


def _logistic(u, lo, amp, s, u0):
  """`lo + amp / (1 + exp(s (u - u0)))`, overflow-free via `expit`."""
  return lo + amp * scipy.special.expit(-s * (u - u0))


# Bounds of (lo, amp, s, u0) with u in [0, 1]; the slope cap only stops a
# step between two evaluations from running off to infinity.
_LOWER = (-np.inf, 0.0, 0.0, -1.0)
_UPPER = (np.inf, np.inf, 1e3, 2.0)


def _logistic_grid(u: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Best logistic on a grid of `(s, u0)`, solving `lo, amp` exactly.

  For fixed `s, u0` the model is linear in `lo, amp`, so each grid point is
  one closed-form least-squares solve (amp clipped at 0). This finds the
  basin that a local optimiser alone can miss (the loss is flat in `u0`
  wherever the sigmoid is flat over the data) at the cost of one vectorised
  pass.

  Args:
    u: `[n]` times rescaled to `[0, 1]`.
    y: `[n]` values of a falling curve.

  Returns:
    `[4]` parameters `(lo, amp, s, u0)`.
  """
  s_grid = np.geomspace(2.0, 500.0, 16)
  u0_grid = np.linspace(-0.1, 1.1, 49)
  ss, uu = np.meshgrid(s_grid, u0_grid, indexing='ij')
  ss, uu = ss.reshape(-1, 1), uu.reshape(-1, 1)
  f = scipy.special.expit(-ss * (u[None, :] - uu))          # [grid, n]
  f_mean, y_mean = f.mean(axis=1), y.mean()
  fc = f - f_mean[:, None]
  var = np.sum(fc * fc, axis=1)
  amp = np.where(var > 0, (fc @ (y - y_mean)) / np.where(var > 0, var, 1.0),
                 0.0)
  amp = np.maximum(amp, 0.0)
  lo = y_mean - amp * f_mean
  sse = np.sum((y[None, :] - lo[:, None] - amp[:, None] * f) ** 2, axis=1)
  i = int(np.argmin(sse))
  return np.array([lo[i], amp[i], ss[i, 0], uu[i, 0]])


def logistic_fit(
    x,
    y,
    log_time: bool = True,
    direction: str = 'down',
    min_drop: float = 0.1,
    min_r2: float = 0.5,
) -> Timing:
  """Fits a four-parameter logistic and reads the transition off it.

  Model, with `t = log(x)` (`log_time`) or `t = x`, and `hi - lo = amp >= 0`:
  `y = lo + amp / (1 + exp(s (t - t0)))`, `s >= 0` (a falling curve; a rising
  one is fitted as `-y`). Least squares by `scipy.optimize.curve_fit` (trf,
  bounded) on `t` rescaled to `[0, 1]`, started from the best point of a
  `(s, t0)` grid (`_logistic_grid`). Times:

  * midpoint: `t0` (half of the drop done), mapped back to steps
    (`exp(t0)` in log time);
  * onset / end: where 10% / 90% of the drop is done,
    `t0 -/+ ln(9) / s`, mapped back to steps. They may lie outside the
    observed steps (extrapolated from the fit);
  * fit_r2: `1 - SS_res / SS_tot` over the evaluations used.

  The transition counts as observed (`crossed=True`) only if all hold:
  the fitted drop `amp >= min_drop` (absolute, in units of `y`: 0.1 is a
  seventh of the two-way chance loss `ln 2` and a tenth of the accuracy
  range); at least two evaluations lie on each side of `t0` (so the midpoint
  is inside the observed range and seen from both sides); and
  `fit_r2 >= min_r2` (a noisy flat curve can be fitted by a small jump, but
  that jump explains little of its variance). Otherwise every time is NaN;
  `fit_r2` is still reported. If the local refinement fails to converge,
  the grid optimum stands as the fit. Curves with fewer than five usable
  evaluations, or a constant one, are not fitted (all NaN).

  Args:
    x: `[n]` steps, ascending.
    y: `[n]` curve values; NaN evaluations are dropped (and `x <= 0` in log
      time).
    log_time: fit in `log(x)` rather than `x`.
    direction: 'down' (losses) or 'up' (accuracies, progress measures).
    min_drop: smallest fitted amplitude that counts as a transition.
    min_r2: smallest coefficient of determination that counts as a fit.

  Returns:
    `Timing` with onset, midpoint, end, crossed and fit_r2.
  """
  sign = _check_direction(direction)
  x, y = _clean(x, y, log_time=log_time)
  # Four parameters need at least five points to leave any residual.
  if x.size < 5:
    return NOT_CROSSED
  y = sign * y
  t = np.log(x) if log_time else x
  t_lo, t_span = t[0], t[-1] - t[0]
  if not t_span > 0:
    return NOT_CROSSED
  # Fitting in u in [0, 1] keeps the optimiser well scaled whether steps run
  # to 1e3 or 1e8.
  u = (t - t_lo) / t_span
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  if not ss_tot > 0:
    return NOT_CROSSED

  best = _logistic_grid(u, y)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', scipy.optimize.OptimizeWarning)
      popt, _ = scipy.optimize.curve_fit(
          _logistic, u, y, p0=best, bounds=(_LOWER, _UPPER), max_nfev=500)
    if np.all(np.isfinite(popt)):
      best = popt
  except (RuntimeError, ValueError):
    pass  # Keep the grid optimum: a least-squares fit too, on a grid.
  best_sse = float(np.sum((y - _logistic(u, *best)) ** 2))
  _, amp, s, u0 = (float(p) for p in best)
  r2 = 1.0 - best_sse / ss_tot
  # Two evaluations strictly on each side of the midpoint.
  n_before = int(np.sum(u < u0))
  n_after = int(np.sum(u > u0))
  if not (amp >= min_drop and r2 >= min_r2 and n_before >= 2
          and n_after >= 2 and s > 0):
    return Timing(fit_r2=r2)

  def to_step(uu: float) -> float:
    tt = t_lo + uu * t_span
    return float(np.exp(tt)) if log_time else float(tt)

  # Fraction done f = 1 / (1 + exp(-s (u - u0))) = 0.1 at u0 - ln 9 / s.
  width = math.log((1 - _ONSET_FRACTION) / _ONSET_FRACTION) / s
  return Timing(
      onset=to_step(u0 - width),
      midpoint=to_step(u0),
      end=to_step(u0 + width),
      crossed=True,
      fit_r2=r2,
  )


def _half_crossing(t: np.ndarray, g: np.ndarray, i: int, j: int, h: float):
  """Step between `t[i]` and `t[j]` where `g` equals `h`, linearly."""
  if g[j] == g[i]:
    return float(t[i])
  return float(t[i] + (h - g[i]) * (t[j] - t[i]) / (g[j] - g[i]))


def steepest_descent(
    x,
    y,
    smooth: int = 5,
    log_time: bool = True,
    direction: str = 'down',
    min_drop: float = 0.1,
    noise_z: float = 4.0,
) -> Timing:
  """Step of steepest descent of a smoothed curve.

  1. Smoothing: centred moving average over `smooth` consecutive evaluations
     (odd; 1 disables it), kept only where the window is full, so the ends
     are cropped by `smooth // 2` evaluations rather than biased.
  2. Slope `g = dy/dt` with `t = log(x)` (`log_time`) or `t = x`, by
     second-order finite differences on the (possibly uneven) steps
     (`np.gradient`).
  3. Midpoint: the most negative slope (most positive for 'up'), refined to
     the vertex of the parabola through it and its two neighbours, clipped
     to between them.
  4. Onset / end: nearest steps before / after the peak where the slope
     magnitude falls to half its peak (linearly interpolated); NaN on a side
     where it never does within the data.

  The transition counts as observed only if the slope peak is interior (not
  the first or last smoothed evaluation -- else the slope may still be
  rising beyond the data) and the drop across it is at least `min_drop`
  (absolute, units of `y`). The drop is the mean of the unsmoothed curve up
  to the onset minus its mean from the end on (up to / from the midpoint on
  a side without onset / end): the change between the plateaus either side
  of the transition, which on a flat noisy curve averages the noise away.
  It must also exceed `noise_z` standard errors of that difference, with
  the noise level `sigma = 1.4826 MAD(diff(y)) / sqrt(2)` (robust to the
  few large differences inside a transition).

  Args:
    x: `[n]` steps, ascending.
    y: `[n]` curve values; NaN evaluations are dropped (and `x <= 0` in log
      time) before smoothing.
    smooth: moving-average window, in evaluations (odd, >= 1).
    log_time: slope with respect to `log(x)` rather than `x`.
    direction: 'down' (losses) or 'up' (accuracies, progress measures).
    min_drop: smallest plateau-to-plateau drop that counts as a transition.
    noise_z: smallest drop in standard errors of the plateau difference.

  Returns:
    `Timing` with onset, midpoint, end and crossed; fit_r2 NaN.
  """
  sign = _check_direction(direction)
  if smooth < 1 or smooth % 2 == 0:
    raise ValueError(f'smooth must be an odd integer >= 1, got {smooth}')
  x, y = _clean(x, y, log_time=log_time)
  # Three smoothed points are the fewest with an interior slope peak.
  if x.size < smooth + 2:
    return NOT_CROSSED
  y = sign * y
  t = np.log(x) if log_time else x
  ys = np.convolve(y, np.ones(smooth) / smooth, mode='valid')
  half_w = smooth // 2
  ts = t[half_w:t.size - half_w]
  g = np.gradient(ys, ts)
  p = int(np.argmin(g))
  if p == 0 or p == g.size - 1 or not g[p] < 0:
    return NOT_CROSSED
  # Parabola through (ts, g) at p-1, p, p+1: vertex of the local minimum.
  a, b, _ = np.polyfit(ts[p - 1:p + 2] - ts[p], g[p - 1:p + 2], 2)
  mid_t = ts[p]
  if a > 0:
    mid_t = ts[p] + float(np.clip(-b / (2 * a), ts[p - 1] - ts[p],
                                  ts[p + 1] - ts[p]))

  h = 0.5 * g[p]
  onset_t = end_t = math.nan
  flat_before = np.flatnonzero(g[:p] > h)
  if flat_before.size:
    i = int(flat_before[-1])
    onset_t = _half_crossing(ts, g, i, i + 1, h)
  flat_after = np.flatnonzero(g[p + 1:] > h)
  if flat_after.size:
    j = p + 1 + int(flat_after[0])
    end_t = _half_crossing(ts, g, j - 1, j, h)

  # Plateau-to-plateau drop of the raw curve. The extreme difference of the
  # smoothed curve around the peak would not do: on a flat noisy curve the
  # steepest stretch is, by selection, an extreme excursion of the noise.
  before = y[t <= (onset_t if np.isfinite(onset_t) else mid_t)]
  after = y[t >= (end_t if np.isfinite(end_t) else mid_t)]
  if not before.size or not after.size:
    return NOT_CROSSED
  drop = before.mean() - after.mean()
  # Noise scale from first differences (robust to the few large differences
  # inside the transition): the plateau means must differ by `noise_z`
  # standard errors, else a very noisy curve passes `min_drop` by chance.
  noise = 1.4826 * np.median(np.abs(np.diff(y) - np.median(np.diff(y))))
  noise /= math.sqrt(2.0)
  stderr = noise * math.sqrt(1.0 / before.size + 1.0 / after.size)
  if drop < min_drop or drop < noise_z * stderr:
    return NOT_CROSSED

  to_step = np.exp if log_time else (lambda v: v)
  return Timing(
      onset=float(to_step(onset_t)),
      midpoint=float(to_step(mid_t)),
      end=float(to_step(end_t)),
      crossed=True,
  )


ESTIMATORS: Mapping[str, Callable[..., Timing]] = {
    'threshold': threshold_crossing,
    'logistic': logistic_fit,
    'steepest': steepest_descent,
}


def _kwargs_for(fn: Callable[..., Timing], kw: Mapping[str, object]) -> dict:
  """The subset of `kw` that `fn` accepts."""
  names = inspect.signature(fn).parameters
  return {k: v for k, v in kw.items() if k in names}


def time_all(
    x, y, estimators: Sequence[str] = ('threshold', 'logistic', 'steepest'),
    **kw
) -> dict[str, Timing]:
  """Runs several estimators on one curve.

  Each keyword goes to every chosen estimator that accepts it (e.g.
  `direction` to all three, `level` to `threshold_crossing` only,
  `log_time` to the other two).

  Args:
    x: `[n]` steps, ascending.
    y: `[n]` curve values.
    estimators: names from `ESTIMATORS`.
    **kw: estimator arguments.

  Returns:
    `{name: Timing}` in the order of `estimators`.

  Raises:
    ValueError: for an unknown estimator, or a keyword no chosen estimator
      accepts (likely a typo).
  """
  unknown = [e for e in estimators if e not in ESTIMATORS]
  if unknown:
    raise ValueError(f'unknown estimators {unknown}; known: {list(ESTIMATORS)}')
  used = set()
  for e in estimators:
    used |= set(_kwargs_for(ESTIMATORS[e], kw))
  unused = set(kw) - used
  if unused:
    raise ValueError(f'arguments {sorted(unused)} are accepted by none of '
                     f'{list(estimators)}')
  return {e: ESTIMATORS[e](x, y, **_kwargs_for(ESTIMATORS[e], kw))
          for e in estimators}


def time_curves(
    x, Y, estimators: Sequence[str] = ('threshold', 'logistic', 'steepest'),
    **kw
) -> dict[str, dict[str, np.ndarray]]:
  """Runs `time_all` on every row of `Y` (runs of a grid).

  Args:
    x: `[n]` steps shared by all runs, or `[runs, n]` per run.
    Y: `[runs, n]` curves; NaN marks a missing evaluation.
    estimators: names from `ESTIMATORS`.
    **kw: estimator arguments, as for `time_all`.

  Returns:
    `{name: {field: array [runs]}}` with fields `onset`, `midpoint`, `end`,
    `fit_r2` (float64) and `crossed` (bool).
  """
  Y = np.asarray(Y, dtype=np.float64)
  if Y.ndim != 2:
    raise ValueError(f'Y must be [runs, n], got shape {Y.shape}')
  X = np.broadcast_to(np.asarray(x, dtype=np.float64), Y.shape)
  per_run = [time_all(X[r], Y[r], estimators, **kw) for r in range(Y.shape[0])]
  out = {}
  for e in estimators:
    fields = {}
    for f in dataclasses.fields(Timing):
      dtype = bool if f.name == 'crossed' else np.float64
      fields[f.name] = np.array([getattr(t[e], f.name) for t in per_run],
                                dtype=dtype).reshape(Y.shape[0])
    out[e] = fields
  return out
