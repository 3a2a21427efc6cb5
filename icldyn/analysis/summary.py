"""Across-seed summaries of per-run phase-change times.

This module owns the reduction from one row per run (a `phase_changes.csv`
row, or any dict) to one row per setting: how many seeds, how many of them
made the transition, and the mean time with a percentile-bootstrap
confidence interval (Efron & Tibshirani 1993, "An Introduction to the
Bootstrap", ch. 13). Plain Python and numpy, no I/O: values may arrive as
strings straight from `csv.DictReader`.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

__all__ = ['summarise', 'bootstrap_mean_ci']

_TRUE = frozenset({'true', 't', 'yes', 'y', '1', '1.0'})
_FALSE = frozenset({'false', 'f', 'no', 'n', '0', '0.0', '', 'nan', 'none'})


def _as_bool(v: Any) -> bool:
  """Reads a crossed flag from a bool, a number or a CSV string."""
  if isinstance(v, str):
    s = v.strip().lower()
    if s in _TRUE:
      return True
    if s in _FALSE:
      return False
    raise ValueError(f'cannot read {v!r} as a boolean')
  if v is None:
    return False
  if isinstance(v, float) and math.isnan(v):
    return False
  return bool(v)


def _as_float(v: Any) -> float:
  """Reads a value from a number or a CSV string; '' and None are NaN."""
  if v is None or (isinstance(v, str) and not v.strip()):
    return math.nan
  return float(v)


def bootstrap_mean_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
  """Percentile bootstrap confidence interval of the mean.

  Draws `n_boot` resamples of `values` with replacement, as one
  `np.random.default_rng(seed).integers(0, n, size=(n_boot, n))` index
  array, takes each resample's mean, and returns the `(1-level)/2` and
  `(1+level)/2` quantiles of those means (`np.quantile`, linear
  interpolation).

  Args:
    values: `[n]` finite values.
    n_boot: number of resamples.
    seed: seed of the resampling generator; the same seed and values give
      the same interval.
    level: coverage of the interval.

  Returns:
    `(low, high)`; `(nan, nan)` for fewer than two values, where resampling
    says nothing about spread.
  """
  values = np.asarray(values, dtype=np.float64).reshape(-1)
  n = values.size
  if n < 2:
    return math.nan, math.nan
  rng = np.random.default_rng(seed)
  means = values[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
  low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(low), float(high)


def summarise(
    rows: Sequence[Mapping[str, Any]],
    group_keys: Sequence[str],
    value_key: str,
    crossed_key: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
  """Summarises one timing per setting over seeds.

  Rows are grouped by their values of `group_keys` (missing keys read as
  None), groups in order of first appearance. Per group:

  * `n_seeds`: rows in the group;
  * `n_crossed`: rows whose `crossed_key` is true;
  * `mean`, `std` (ddof=1), `ci_low`, `ci_high`: over the crossed rows whose
    value is finite (a crossed run can lack a value, e.g. the threshold
    estimator's onset); `std` is NaN with one such value and everything is
    NaN with none. The CI is `bootstrap_mean_ci(values, n_boot, seed)`,
    95% percentile bootstrap. Every group uses the same `seed`, so a group's
    interval depends only on its own values, not on the other groups.

  Non-crossed runs are counted but never averaged: their times are not
  observations of the transition (right-censored, at best).

  Args:
    rows: one mapping per run; values may be numbers or CSV strings.
    group_keys: keys whose values define a setting (seed columns excluded by
      the caller).
    value_key: key of the time to summarise (e.g. 'midpoint').
    crossed_key: key of the crossed flag ('True'/'False', 1/0 or bool).
    n_boot: bootstrap resamples.
    seed: bootstrap seed.

  Returns:
    One dict per group: the `group_keys` values, then `n_seeds`,
    `n_crossed`, `mean`, `std`, `ci_low`, `ci_high`.
  """
  groups: dict[tuple[Hashable, ...], list[Mapping[str, Any]]] = {}
  for row in rows:
    groups.setdefault(tuple(row.get(k) for k in group_keys), []).append(row)

  out = []
  for key, members in groups.items():
    crossed = [_as_bool(r.get(crossed_key)) for r in members]
    values = np.array([_as_float(r.get(value_key))
                       for r, c in zip(members, crossed) if c],
                      dtype=np.float64)
    values = values[np.isfinite(values)]
    mean = float(values.mean()) if values.size else math.nan
    std = float(values.std(ddof=1)) if values.size > 1 else math.nan
    ci_low, ci_high = bootstrap_mean_ci(values, n_boot=n_boot, seed=seed)
    out.append({
        **dict(zip(group_keys, key)),
        'n_seeds': len(members),
        'n_crossed': int(sum(crossed)),
        'mean': mean,
        'std': std,
        'ci_low': ci_low,
        'ci_high': ci_high,
    })
  return out
