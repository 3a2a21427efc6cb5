"""`icldyn analyze`: progress measures over the checkpoint stream, phase-change timing, summaries.

    analyze(workdir, measures=None, curves=None) writes (docs/interfaces.md)
      DIR/analysis/progress.csv       step,run,measure,layer,head,layer2,head2,value
      DIR/analysis/phase_changes.csv  run,<settings...>,curve,estimator,
                                      onset,midpoint,end,crossed,fit_r2
      DIR/analysis/summary.csv        <settings...>,curve,estimator,timing,
                                      n_seeds,n_crossed,mean,std,ci_low,ci_high
    and prints the order of events per setting.

Progress measures (`icldyn.analysis.measures`) are computed by one compiled
program per group, vmapped over runs and applied to each checkpoint as the
stream is read. Measures training already logs at every evaluation
(`fsl_train` induction strength and previous-token score) are reused from
metrics.csv by default rather than recomputed.

Curves. A curve spec is `SOURCE/NAME[:DIRECTION[:LEVEL[:CLIP]]]`: SOURCE
is an evaluator of metrics.csv or `progress` (progress.csv measures, named
`{measure}.l{layer}.h{head}` and, for head pairs, `.l{layer2}.h{head2}`
after it). NAME may hold wildcards, and a NAME without them also matches
its per-head children (`fsl_train/induction_strength` is every
`induction_strength.h{h}`). Defaults by name: losses fall to 0.4 ln 2 and
are clipped at ln 2 before timing (the loss first drops from ln(labels) to
ln 2, the chance loss of the two labels in context, within a few thousand
sequences; the phase change is the later drop from that plateau, and a
single logistic fitted across both drops fits neither); accuracies and
probabilities rise to 0.8; everything else (induction strength,
previous-token score, ...) rises to 0.5, unclipped. Default curves:
`fsl_train/loss` and each head's induction strength (metrics.csv, else
progress.csv). Each curve of each run is timed by every estimator of
`icldyn.analysis.timing`; `summary.csv` groups runs by every setting except
`seeds.*` (`icldyn.analysis.summary`).
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import logging
import math
import os
import re
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from icldyn import config as config_lib
from icldyn.analysis import custom as custom_lib
from icldyn.analysis import loader
from icldyn.analysis import measures as measures_lib
from icldyn.analysis import summary as summary_lib
from icldyn.analysis import timing as timing_lib
from icldyn.errors import ConfigError, did_you_mean
from icldyn.store import files as wd_lib

log = logging.getLogger(__name__)

PROGRESS_COLUMNS = wd_lib.PROGRESS_COLUMNS
TIMING_COLUMNS = wd_lib.TIMING_COLUMNS
SUMMARY_COLUMNS = wd_lib.SUMMARY_COLUMNS
ESTIMATORS = ("threshold", "logistic", "steepest")
# Which timings each estimator reports (the threshold crossing has no onset or end).
TIMINGS = {"threshold": ("midpoint",), "logistic": ("onset", "midpoint", "end"),
           "steepest": ("onset", "midpoint", "end")}
CHANCE_LOSS = math.log(2.0)  # two labels in context: the plateau before the phase change
LOSS_LEVEL = 0.4 * CHANCE_LOSS
PROGRESS = "progress"


# --------------------------------------------------------------------------
# Curve specs.


@dataclasses.dataclass(frozen=True)
class CurveSpec:
  """Which curves to time and how.

  Attributes:
    source: an evaluator of metrics.csv, or 'progress' for progress.csv.
    pattern: metric / measure name, fnmatch wildcards allowed.
    direction: 'down' or 'up'.
    level: threshold level.
    clip: None, or a bound the curve is clipped to before timing (values
      above it for 'down' curves, below it for 'up' curves).
  """
  source: str
  pattern: str
  direction: str
  level: float
  clip: float | None = None

  @property
  def text(self) -> str:
    return f"{self.source}/{self.pattern}"

  def matches(self, name: str) -> bool:
    """Whether a metric / measure name is one of this spec's curves."""
    if fnmatch.fnmatchcase(name, self.pattern):
      return True
    plain = not any(c in self.pattern for c in "*?[")
    return plain and (name.startswith(self.pattern + ".") or name.startswith(self.pattern + "@"))


def default_direction(name: str) -> tuple[str, float, float | None]:
  """(direction, threshold level, clip) of a metric or measure by its name."""
  base = name.split("/")[-1].split(".")[0].split("@")[0]
  if "loss" in base:
    return "down", LOSS_LEVEL, CHANCE_LOSS
  if base.startswith("acc") or base.startswith("p_"):
    return "up", 0.8, None
  return "up", 0.5, None


def _number(text: str, what: str) -> float:
  try:
    v = float(text)
  except ValueError as e:
    raise ConfigError("--curve", f"{what} must be a number, got {text!r}") from e
  if not math.isfinite(v):
    raise ConfigError("--curve", f"{what} must be finite, got {text!r}")
  return v


def parse_curve(text: str) -> CurveSpec:
  """Parses `SOURCE/NAME[:DIRECTION[:LEVEL[:CLIP]]]` (raises ConfigError).

  CLIP is a number or 'none'; see the module docstring for the defaults.
  """
  body, *opts = text.strip().split(":")
  source, sep, pattern = body.partition("/")
  if not sep or not source or not pattern:
    raise ConfigError("--curve", "expected EVALUATOR/METRIC[:up|down[:LEVEL[:CLIP]]], "
                      f"got {text!r}")
  direction, level, clip = default_direction(pattern)
  if len(opts) > 3:
    raise ConfigError("--curve", f"too many ':' parts in {text!r}")
  if opts and opts[0]:
    if opts[0] not in ("up", "down"):
      raise ConfigError("--curve", f"direction must be 'up' or 'down', got {opts[0]!r}")
    if opts[0] != direction:
      level, clip = (LOSS_LEVEL if opts[0] == "down" else 0.5), None
    direction = opts[0]
  if len(opts) >= 2 and opts[1]:
    level = _number(opts[1], "level")
  if len(opts) == 3:
    clip = None if opts[2].lower() == "none" else _number(opts[2], "clip")
  return CurveSpec(source, pattern, direction, level, clip)


def time_curve(steps: np.ndarray, values: np.ndarray, spec: CurveSpec,
               estimators: Sequence[str] = ESTIMATORS) -> dict[str, timing_lib.Timing]:
  """Every estimator's timing of one curve under a spec (clipped first, if it says so)."""
  y = np.asarray(values, np.float64)
  if spec.clip is not None:
    y = np.minimum(y, spec.clip) if spec.direction == "down" else np.maximum(y, spec.clip)
  return timing_lib.time_all(steps, y, estimators, direction=spec.direction, level=spec.level)


def default_curves(task) -> list[CurveSpec]:
  """The curves a task's workdirs are timed by unless `--curve` says otherwise."""
  return [parse_curve(c) for c in task.default_curves]


def parse_measures(measures: str | Sequence[Any] | None
                   ) -> tuple[list[str], bool, list[custom_lib.Measure]]:
  """(built-in measure names, whether they are the default set, custom measures).

  Items are built-in names, 'all', 'default', or custom measures: functions,
  registered names or `module:function` (`icldyn.analysis.custom`).
  """
  if measures is None:
    return list(measures_lib.DEFAULT_MEASURES), True, []
  items = measures.split(",") if isinstance(measures, str) else list(measures)
  items = [m.strip() if isinstance(m, str) else m for m in items]
  items = [m for m in items if not isinstance(m, str) or m]
  custom = [custom_lib.resolve(m) for m in items
            if m not in measures_lib.MEASURES and custom_lib.is_custom(m)]
  items = [m for m in items if isinstance(m, str) and not
           (m not in measures_lib.MEASURES and custom_lib.is_custom(m))]
  if items == ["all"]:
    return list(measures_lib.MEASURES), False, custom
  if items == ["default"]:
    return list(measures_lib.DEFAULT_MEASURES), True, custom
  unknown = [m for m in items if m not in measures_lib.MEASURES]
  if unknown:
    raise ConfigError("--measures", f"unknown measure(s) {', '.join(unknown)}"
                      f"{did_you_mean(unknown[0], measures_lib.MEASURES)} (known: "
                      f"{', '.join(measures_lib.MEASURES)}, or 'all', or a custom measure "
                      "module:function)")
  return items, False, custom


# --------------------------------------------------------------------------
# Progress measures over the checkpoint stream.


def _cell(v: Any) -> str:
  return "" if v is None else str(v)


def progress_name(key: measures_lib.RowKey) -> str:
  """A progress.csv row's curve name, e.g. `k_composition.l1.h3.l0.h2`."""
  name = key.measure
  if key.layer is not None:
    name += f".l{key.layer}"
  if key.head is not None:
    name += f".h{key.head}"
  if key.layer2 is not None:
    name += f".l{key.layer2}.h{key.head2}"
  return name


class _ProgressFile:
  """progress.csv written row block by row block to a temporary file, then renamed."""

  def __init__(self, path: str):
    self.path = path
    self.tmp = f"{path}.tmp.{os.getpid()}"
    self.f = open(self.tmp, "w")
    self.f.write(",".join(PROGRESS_COLUMNS) + "\n")

  def write(self, step: int, prefixes: list[str], values: np.ndarray) -> None:
    """Rows `step,{prefix}{value}` for prefixes aligned with values.ravel()."""
    s = f"{step},"
    self.f.write("".join([s + p + ("%.9g" % v) + "\n"
                          for p, v in zip(prefixes, values.ravel().tolist())]))

  def close(self) -> None:
    self.f.flush()
    os.fsync(self.f.fileno())
    self.f.close()
    os.replace(self.tmp, self.path)

  def abort(self) -> None:
    self.f.close()
    if os.path.exists(self.tmp):
      os.remove(self.tmp)


def _progress_group(wd: loader.Workdir, pg, program: measures_lib.Program, out: _ProgressFile,
                    keep: list[int], eval_size: int) -> dict[int, tuple[list, list]]:
  """Runs a group's program over its stream; returns kept columns per run.

  Returns:
    {run: (steps, [values [len(keep)] per step])} for the layout columns
    `keep` (those a progress curve needs).
  """
  runs = pg.group.runs
  steps = wd.stream_steps(pg.group.index)
  kept: dict[int, tuple[list, list]] = {r: ([], []) for r in runs}
  if not steps or not program.layout:
    if not steps:
      log.info("group %d has no checkpoint stream; no progress measures", pg.group.index)
    return kept
  keys = [k for rows in program.layout.values() for k in rows]
  middles = [",".join(_cell(v) for v in k) for k in keys]
  prefixes = [f"{run},{m}," for run in runs for m in middles]
  props = jax.device_put(pg.props)
  batch = None
  if program.needs_batch:
    batch = jax.device_put(measures_lib.eval_batch(pg.static, pg.table, pg.props, eval_size))
  t0 = time.time()

  def flush(item):
    step, result = item
    values = measures_lib.flatten(jax.device_get(result), program.layout)
    out.write(step, prefixes, values)
    for i, run in enumerate(runs):
      kept[run][0].append(step)
      kept[run][1].append(values[i, keep])

  pending = None
  for n, (step, params) in enumerate(loader.stream(wd.path, pg.group.index, steps)):
    result = program.fn(params, batch, props)  # dispatched asynchronously
    if pending is not None:
      flush(pending)  # formats the previous checkpoint while this one computes
    pending = (step, result)
    if n == 0:
      log.info("group %d: measures compiled and first checkpoint done in %.1fs",
               pg.group.index, time.time() - t0)
  flush(pending)
  log.info("group %d: %d runs x %d checkpoints in %.1fs", pg.group.index, len(runs), len(steps),
           time.time() - t0)
  return kept


def write_progress(wd: loader.Workdir, groups, programs, path: str,
                   progress_curves: dict[str, CurveSpec], curve_data: dict,
                   eval_size: int) -> int:
  """Writes progress.csv (atomically) and adds the progress curves to `curve_data`.

  Returns:
    Checkpoints read.
  """
  progress = _ProgressFile(path)
  n_ckpt = 0
  try:
    for pg, program in zip(groups, programs):
      names = [progress_name(k) for rows in program.layout.values() for k in rows]
      cols = [i for i, n in enumerate(names) if n in progress_curves]
      kept = _progress_group(wd, pg, program, progress, cols, eval_size)
      for i, col in enumerate(cols):
        spec = progress_curves[names[col]]
        _, per_run = curve_data.setdefault(f"{PROGRESS}/{names[col]}", (spec, {}))
        for run, (steps, values) in kept.items():
          if steps:
            per_run[run] = loader.Curve(np.asarray(steps, np.int64),
                                        np.asarray([v[i] for v in values], np.float64))
      n_ckpt += len(wd.stream_steps(pg.group.index)) if program.layout else 0
    progress.close()
  except BaseException:
    progress.abort()
    raise
  return n_ckpt


# --------------------------------------------------------------------------
# Timing.


def phase_rows(wd: loader.Workdir, curves: dict[str, tuple[CurveSpec, dict[int, loader.Curve]]],
               estimators: Sequence[str] = ESTIMATORS) -> list[dict[str, Any]]:
  """One row per run x curve x estimator.

  Args:
    wd: the workdir.
    curves: {curve name: (its spec, {run: Curve})}.
    estimators: names from `timing.ESTIMATORS`.

  Returns:
    Rows with the columns of phase_changes.csv, by run, then curve, then estimator.
  """
  rows = []
  for r in wd.runs:
    run = int(r["run"])
    settings = {k: r[k] for k in wd.settings}
    for name, (spec, per_run) in curves.items():
      c = per_run.get(run)
      if c is None:
        continue
      for est, t in time_curve(c.steps, c.values, spec, estimators).items():
        rows.append({"run": run, **settings, "curve": name, "estimator": est,
                     "onset": t.onset, "midpoint": t.midpoint, "end": t.end,
                     "crossed": bool(t.crossed), "fit_r2": t.fit_r2})
  return rows


def patching_rows(path: str, columns: Sequence[str]) -> list[dict[str, str]]:
  """The edge timings an earlier `icldyn patch` wrote into phase_changes.csv.

  `icldyn analyze` rewrites phase_changes.csv from the curves it times; the
  edge rows (curve `patching/EDGE`) come from patching, which it does not
  redo, so they are kept (and summarised). Rows of a file with other
  columns (another grid) are dropped.

  Args:
    path: phase_changes.csv (it may not exist).
    columns: the columns this analysis writes.

  Returns:
    The file's edge rows as CSV strings, or [].
  """
  if not os.path.isfile(path):
    return []
  edges = [r for r in wd_lib.read_csv(path)
           if r.get("curve", "").startswith(wd_lib.PATCHING_CURVE_PREFIX)]
  return edges if edges and list(edges[0].keys()) == list(columns) else []


def summary_rows(rows: list[dict[str, Any]], settings: Sequence[str], n_boot: int = 1000,
                 seed: int = 0) -> list[dict[str, Any]]:
  """Per setting (all settings but seeds.*), curve, estimator and timing: stats over seeds."""
  keys = [s for s in settings if not s.startswith("seeds.")]
  by: dict[tuple[str, str], list[dict]] = {}
  for row in rows:
    by.setdefault((row["curve"], row["estimator"]), []).append(row)
  out = []
  for (curve, est), sub in by.items():
    for timing in TIMINGS.get(est, ("onset", "midpoint", "end")):
      for s in summary_lib.summarise(sub, keys, timing, "crossed", n_boot=n_boot, seed=seed):
        stats = {k: s[k] for k in ("n_seeds", "n_crossed", "mean", "std", "ci_low", "ci_high")}
        out.append({**{k: s[k] for k in keys}, "curve": curve, "estimator": est,
                    "timing": timing, **stats})
  return out


def write_summary(path: str, rows: list[dict[str, Any]], settings: Sequence[str],
                  n_boot: int = 1000) -> list[dict[str, Any]]:
  """Writes summary.csv from phase_changes.csv's rows (`summary_rows`); returns its rows."""
  summ = summary_rows(rows, settings, n_boot=n_boot)
  keys = [s for s in settings if not s.startswith("seeds.")]
  write_csv(path, [*keys, *SUMMARY_COLUMNS], summ)
  return summ


def write_csv(path: str, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
  """Writes rows atomically; cells by `workdir.format_value`."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(columns)
  for r in rows:
    w.writerow([wd_lib.format_value(r.get(c)) for c in columns])
  wd_lib.atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------
# The readable table.


def _fmt_time(v: float) -> str:
  return "-" if not math.isfinite(v) else f"{v:.3g}"


# Which estimator's midpoint orders the events and gives the CI: the headline one first.
ORDER_BY = (wd_lib.HEADLINE_ESTIMATOR,) + tuple(
    e for e in ("logistic", "steepest", "threshold") if e != wd_lib.HEADLINE_ESTIMATOR)


def events_table(summary: list[dict[str, Any]], settings: Sequence[str], varying: Sequence[str],
                 max_lines: int = 60) -> str:
  """The order of events per setting, from summary rows.

  One line per curve that some seed crossed: for each estimator, seeds
  crossed / seeds and the mean midpoint (± std over seeds), with the
  bootstrap 95% CI of the first estimator of ORDER_BY that timed it, which
  also orders the lines.
  """
  keys = [s for s in settings if not s.startswith("seeds.")]
  groups: dict[tuple, dict[str, dict[str, dict]]] = {}
  for r in summary:
    if r["timing"] == "midpoint":
      g = groups.setdefault(tuple(r[k] for k in keys), {})
      g.setdefault(r["curve"], {})[r["estimator"]] = r
  ests = sorted({e for g in groups.values() for c in g.values() for e in c},
                key=lambda e: ORDER_BY.index(e) if e in ORDER_BY else len(ORDER_BY))

  def order(item):
    for e in ORDER_BY:
      v = item[1].get(e, {}).get("mean", math.nan)
      if math.isfinite(v):
        return (0, v)
    return (1, 0.0)

  lines, hidden = [], 0
  for gkey, per_curve in groups.items():
    label = " ".join(f"{k}={v}" for k, v in zip(keys, gkey) if k in varying) or "all runs"
    shown = [(c, e) for c, e in sorted(per_curve.items(), key=order)
             if any(x.get("n_crossed", 0) for x in e.values())]
    hidden += len(per_curve) - len(shown)
    for i, (curve, per_est) in enumerate(shown):
      cells = [label if i == 0 else "", curve]
      for e in ests:
        r = per_est.get(e)
        if r is None:
          cells.append("")
          continue
        cell = f"{r['n_crossed']}/{r['n_seeds']} {_fmt_time(r['mean'])}"
        if math.isfinite(r["std"]):
          cell += f" ± {_fmt_time(r['std'])}"
        cells.append(cell)
      first = next(((e, per_est[e]) for e in ORDER_BY if e in per_est
                    and math.isfinite(per_est[e]["mean"])), None)
      if first and math.isfinite(first[1]["ci_low"]):
        ci = f"[{_fmt_time(first[1]['ci_low'])}, {_fmt_time(first[1]['ci_high'])}]"
        cells.append(ci if first[0] == ORDER_BY[0] else f"{ci} ({first[0]})")
      else:
        cells.append("")
      lines.append(cells)
    if not shown:
      lines.append([label, "(no transition)"] + [""] * (len(ests) + 1))
  header = ["setting", "curve", *ests, f"{ORDER_BY[0]} 95% CI"]
  cut = max(0, len(lines) - max_lines)
  lines = lines[:max_lines]
  widths = [max([len(h)] + [len(l[i]) for l in lines]) for i, h in enumerate(header)]
  fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
  text = ["Phase changes: midpoint in training sequences by estimator (columns), as seeds "
          "crossed/seeds and mean ± std over the seeds that crossed; in order of the "
          f"{ORDER_BY[0]} midpoint, with its bootstrap 95% CI last (the estimator report.md "
          "and the figures show)", fmt(header)]
  text += [fmt(l) for l in lines]
  if cut:
    text.append(f"... {cut} more lines in analysis/summary.csv")
  if hidden:
    text.append(f"({hidden} curve(s) with no transition in any seed not shown)")
  return "\n".join(text)


# --------------------------------------------------------------------------
# The command.


def _expand(spec: CurveSpec, names: Sequence[str]) -> list[str]:
  return sorted((n for n in names if spec.matches(n)), key=_natural)


def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _logged(metric: str, prefixes: Sequence[str]) -> bool:
  """Whether a headline-evaluator metric is one training logs (`x.h` prefixes a head)."""
  return any(metric == p or (p.endswith(".h") and metric.startswith(p)) for p in prefixes)


def _read_metric_curves(wd: loader.Workdir, specs: Sequence[CurveSpec], reuse: bool):
  """metrics.csv curves the specs match, plus the logged measures when `reuse`.

  Returns:
    ({(evaluator, metric): {run: Curve}}, every (evaluator, metric) in the file).
  """
  seen: set[tuple[str, str]] = set()
  task = config_lib.task_of(wd.config)
  headline = task.headline.split("/")[0]
  logged = ([p for ps in measures_lib.logged_by_train(task.induction_metric).values() for p in ps]
            if reuse else [])

  def keep(evaluator: str, metric: str) -> bool:
    seen.add((evaluator, metric))
    if evaluator == headline and _logged(metric, logged):
      return True  # to check that every run has them
    return any(s.source == evaluator and s.matches(metric) for s in specs)

  return loader.read_metrics(wd.path, keep), seen


def _drop_logged(names: list[str], metrics, run_ids: set[int], task) -> list[str]:
  """Data measures minus those training logged for every run (reused from metrics.csv)."""
  out = list(names)
  headline = task.headline.split("/")[0]
  for m, prefixes in measures_lib.logged_by_train(task.induction_metric).items():
    have = [k for k in metrics if k[0] == headline and _logged(k[1], prefixes)]
    found = {p for k in have for p in prefixes if _logged(k[1], [p])}
    if m in out and found == set(prefixes) and all(run_ids <= set(metrics[k]) for k in have):
      out.remove(m)
      log.info("measure %s: reusing %s/{%s} of metrics.csv", m, headline,
               ",".join(p + ("*" if p.endswith(".h") else "") for p in prefixes))
  return out


def _resolve_metric_curves(specs: Sequence[CurveSpec], metrics, seen, strict: bool):
  """Curves of metrics.csv, and the specs left for progress measures.

  A default spec that matches no metric falls back to the progress measure
  of the same name; a user's (`strict`) raises ConfigError.
  """
  curves: dict[str, tuple[CurveSpec, dict[int, loader.Curve]]] = {}
  rest: list[CurveSpec] = []
  for spec in specs:
    if spec.source == PROGRESS:
      rest.append(spec)
      continue
    found = _expand(spec, [m for e, m in metrics if e == spec.source])
    if not found:
      if strict:
        avail = sorted({f"{e}/{m}" for e, m in seen})
        hint = did_you_mean(f"{spec.source}/{spec.pattern}", avail)
        raise ConfigError("--curve", f"no metric matches {spec.text} in metrics.csv{hint} "
                          f"(has {', '.join(avail[:12])}{' ...' if len(avail) > 12 else ''})")
      fallback = CurveSpec(PROGRESS, spec.pattern, spec.direction, spec.level)
      log.info("curve %s not in metrics.csv; timing %s instead", spec.text, fallback.text)
      rest.append(fallback)
    for name in found:
      curves[f"{spec.source}/{name}"] = (spec, metrics[(spec.source, name)])
  return curves, rest


def _resolve_progress_curves(specs: Sequence[CurveSpec], programs, strict: bool
                             ) -> dict[str, CurveSpec]:
  """{progress curve name: spec} among the measures the programs compute."""
  names = sorted({progress_name(k) for p in programs for rows in p.layout.values() for k in rows},
                 key=_natural)
  computing = sorted({m for p in programs for m in p.measures})
  out: dict[str, CurveSpec] = {}
  for spec in specs:
    found = _expand(spec, names)
    if not found:
      if strict:
        raise ConfigError("--curve", f"no progress measure matches {spec.text} (computing: "
                          f"{', '.join(computing) or 'none'}; add it with --measures)")
      log.info("curve %s: no such progress measure; not timed", spec.text)
    for name in found:
      out.setdefault(name, spec)
  return out


def analyze(workdir: str, measures: str | Sequence[str] | None = None,
            curves: Sequence[str] | None = None, quiet: bool = False, *,
            eval_size: int = measures_lib.EVAL_SIZE, clamps: Sequence[str] | None = None,
            estimators: Sequence[str] = ESTIMATORS, n_boot: int = 1000,
            chunk: int | None = None, out=None) -> dict[str, Any]:
  """Progress measures, phase-change times and their summary for a workdir.

  Args:
    workdir: a trained workdir.
    measures: None (defaults: every measure but 'clamped'; data measures
      that metrics.csv already has for every run are reused, not
      recomputed), 'all', or names from `measures.MEASURES` as a list or
      comma-separated string ('' for none); custom measures
      (`icldyn.analysis.custom`: functions, registered names,
      `module:function`) join them, and their curves are timed too.
    curves: curve specs `SOURCE/NAME[:up|down[:LEVEL]]` (replace the task's
      defaults; few-shot: `fsl_train/loss` and each head's induction strength).
    quiet: no table on stdout (log lines follow the logging set-up; the
      CLI silences them with --quiet).
    eval_size: sequences per run in the analysis batch of data measures.
    clamps: named clamps of the 'clamped' measure (default
      `measures.default_clamps`).
    estimators: timing estimators.
    n_boot: bootstrap resamples of the summary's confidence intervals.
    chunk: runs per vmap in data measures; see `measures.make_program`.
    out: stream for the table (default stdout).

  Returns:
    {'progress', 'phase_changes', 'summary': paths; 'measures': computed
    measures; 'curves': timed curve names; 'checkpoints': checkpoints read;
    'seconds'}.

  Raises:
    ConfigError: bad workdir, measure, curve or clamp (before anything is written).
  """
  t0 = time.time()
  wd = loader.open_workdir(workdir)
  task = config_lib.task_of(wd.config)
  names, is_default, custom = parse_measures(measures)
  specs = [parse_curve(c) for c in curves] if curves else default_curves(task) + [
      CurveSpec(PROGRESS, m.name, m.direction, m.level) for m in custom]
  bad = [e for e in estimators if e not in timing_lib.ESTIMATORS]
  if bad:
    raise ConfigError("estimators", f"unknown {bad}; known: {list(timing_lib.ESTIMATORS)}")

  metrics, seen = _read_metric_curves(wd, [s for s in specs if s.source != PROGRESS], is_default)
  if is_default:
    names = _drop_logged(names, metrics, {int(r["run"]) for r in wd.runs}, task)
  curve_data, progress_specs = _resolve_metric_curves(specs, metrics, seen, bool(curves))
  groups = wd.prepared().groups if names or custom else []
  programs = [measures_lib.make_program(pg.static, names, clamps, chunk, custom, pg.table,
                                        pg.props) for pg in groups]
  progress_curves = _resolve_progress_curves(progress_specs, programs, bool(curves))

  os.makedirs(os.path.join(wd.path, wd_lib.ANALYSIS_DIR), exist_ok=True)
  paths = {k: os.path.join(wd.path, name) for k, name in
           (("progress", wd_lib.PROGRESS_CSV), ("phase_changes", wd_lib.PHASE_CHANGES_CSV),
            ("summary", wd_lib.SUMMARY_CSV))}
  n_ckpt = write_progress(wd, groups, programs, paths["progress"], progress_curves, curve_data,
                          eval_size)

  t1 = time.time()
  rows = phase_rows(wd, curve_data, estimators)
  columns = ["run", *wd.settings, *TIMING_COLUMNS]
  rows = rows + patching_rows(paths["phase_changes"], columns)
  write_csv(paths["phase_changes"], columns, rows)
  summ = write_summary(paths["summary"], rows, wd.settings, n_boot=n_boot)
  keys = [s for s in wd.settings if not s.startswith("seeds.")]
  log.info("timed %d curve(s) x %d run(s) in %.1fs", len(curve_data), len(wd.runs),
           time.time() - t1)
  if not quiet:
    varying = [k for k in keys if len({r[k] for r in wd.runs}) > 1]
    print(events_table(summ, wd.settings, varying), file=out or sys.stdout, flush=True)
  computed = [m for m in measures_lib.MEASURES + tuple(c.name for c in custom)
              if any(m in p.measures for p in programs)]
  return {**paths, "measures": computed,
          "curves": list(curve_data), "checkpoints": n_ckpt, "seconds": time.time() - t0}
