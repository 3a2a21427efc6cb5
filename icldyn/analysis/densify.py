"""`icldyn densify`: re-run training around each phase change, saving checkpoints densely there.

Training is bitwise deterministic for a given grid, but the checkpoint
stream holds parameters only, and a run cannot continue from parameters
alone (Adam's moments are not saved there); full train states exist only at
the two newest resume points. So densify re-trains each group from the
newest resume state at or before its first window, or from initialisation
when there is none (the usual case: resume states sit near the end of
training), up to the end of its last window. It builds the programs exactly
as `icldyn train` does (same grid, padding, sharding and compile options),
so the re-run is the original run:

* at every stored evaluation it passes, each metric (the `train`
  evaluator's running means included) is compared with metrics.csv as
  written (9 significant digits), and at every stored stream checkpoint the
  parameters are compared bit for bit;
* only if everything matches are the dense checkpoints (sealed with their
  manifests, as training seals its own) moved into
  `checkpoints/g{group}/stream/` (so `icldyn analyze` reads them) and the
  evaluations at the dense steps appended to metrics.csv (every evaluator
  but `train`, whose running mean would cover a different span); otherwise
  `NotReproduced` is raised and nothing is written.

Windows. `window='auto'` times `curve` (default: the task's headline curve,
`fsl_train/loss` for the few-shot task) of every
run with the estimators of `icldyn.analysis.timing` and takes the span of
its transition (logistic onset to end; else the steepest-descent span;
else the threshold crossing), widened to the stored evaluations around it;
overlapping spans of a group are merged. `window='START:END'` (training
sequences) applies one span to every group. Each window gets `num` dense
steps, evenly spaced in optimizer steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from icldyn import build
from icldyn import config as config_lib
from icldyn import group as group_lib
from icldyn.analysis import command
from icldyn.analysis import loader
from icldyn.errors import ConfigError
from icldyn.store import checkpoints as ckpt_lib
from icldyn.store import files as wd_lib

log = logging.getLogger(__name__)

STAGING = "dense_staging"


class NotReproduced(RuntimeError):
  """The re-run differs from the stored metrics or checkpoints (nothing was written)."""


@dataclasses.dataclass
class GroupPlan:
  """What densify does for one group (steps in optimizer steps)."""
  group: int
  windows: list[tuple[int, int]]  # sequences
  dense: list[int]
  start: int  # optimizer step the re-run starts from (0 or a resume point)
  end: int


def parse_window(window: str | tuple[int, int] | None) -> tuple[int, int] | None:
  """None for 'auto', else (start, end) sequences (raises ConfigError)."""
  if window is None or window == "auto":
    return None
  if isinstance(window, str):
    a, sep, b = window.partition(":")
    try:
      lo, hi = int(float(a)), int(float(b))
    except ValueError:
      sep = ""
    if not sep:
      raise ConfigError("--window", f"expected 'auto' or START:END in sequences, got {window!r}")
  else:
    lo, hi = (int(v) for v in window)
  if not 0 <= lo < hi:
    raise ConfigError("--window", f"need 0 <= START < END, got {lo}:{hi}")
  return lo, hi


def transition_span(steps: np.ndarray, values: np.ndarray, spec: command.CurveSpec,
                    evals: np.ndarray) -> tuple[int, int] | None:
  """The stored evaluations (sequences) around a curve's transition, or None."""
  t = command.time_curve(steps, values, spec)
  a = b = math.nan
  for est in ("logistic", "steepest", "threshold"):
    ti = t[est]
    if ti.crossed:
      a = ti.onset if math.isfinite(ti.onset) else ti.midpoint
      b = ti.end if math.isfinite(ti.end) else ti.midpoint
      break
  if not (math.isfinite(a) and math.isfinite(b)):
    return None
  before = evals[evals <= a]
  after = evals[evals >= b]
  lo = int(before[-1]) if before.size else int(evals[0])
  hi = int(after[0]) if after.size else int(evals[-1])
  return (lo, hi) if hi > lo else None


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
  out: list[list[int]] = []
  for lo, hi in sorted(spans):
    if out and lo <= out[-1][1]:
      out[-1][1] = max(out[-1][1], hi)
    else:
      out.append([lo, hi])
  return [(a, b) for a, b in out]


def plan(workdir: str | loader.Workdir, window: str | tuple[int, int] | None = "auto",
         num: int = 32, curve: str | None = None) -> list[GroupPlan]:
  """The dense steps of each group that has a window (no training).

  Args:
    workdir: a trained workdir (path or opened).
    window: 'auto' or START:END (sequences).
    num: dense steps per window.
    curve: the curve whose transitions 'auto' finds (default: the task's
      first default curve).
  """
  wd = workdir if isinstance(workdir, loader.Workdir) else loader.open_workdir(workdir)
  fixed = parse_window(window)
  if curve is None:
    curve = config_lib.task_of(wd.config).default_curves[0]
  spec = command.parse_curve(curve)
  if num < 1:
    raise ConfigError("--num", "must be >= 1")
  curves = {}
  if fixed is None:
    key = (spec.source, spec.pattern)
    curves = loader.read_metrics(wd.path, lambda e, m: (e, m) == key).get(key, {})
    if not curves:
      raise ConfigError("--curve", f"{spec.text} is not in metrics.csv")
  plans = []
  for pg in wd.prepared().groups:
    batch = pg.static.batch_size
    sched = group_lib.schedule(pg.group.config, batch)
    evals, total = sched.evals, sched.total
    if fixed is None:
      eval_seqs = np.asarray(evals, np.int64) * batch
      spans = [s for r in pg.group.runs if r in curves
               for s in [transition_span(curves[r].steps, curves[r].values, spec, eval_seqs)]
               if s is not None]
    else:
      spans = [(min(fixed[0], total * batch), min(fixed[1], total * batch))]
      spans = [s for s in spans if s[1] > s[0]]
    windows = _merge(spans)
    if not windows:
      log.info("group %d: no transition of %s; nothing to densify", pg.group.index, spec.text)
      continue
    stored = set(loader.stream_steps(wd.path, pg.group.index))
    dense = set()
    for lo, hi in windows:
      a, b = lo / batch, hi / batch
      for k in range(1, num + 1):
        t = int(round(a + k * (b - a) / (num + 1)))
        if 0 < t <= total and t * batch not in stored:
          dense.add(t)
    dense = sorted(dense)
    if not dense:
      continue
    end = max(dense[-1], max((t for t in evals if t * batch <= windows[-1][1]), default=0))
    store = ckpt_lib.Store(wd.path, pg.group.index, read_only=True)
    try:
      resumes = [s // batch for s in store.resume_steps() if s // batch <= dense[0]]
    finally:
      store.close()
    plans.append(GroupPlan(pg.group.index, windows, dense, max(resumes, default=0), end))
  return plans


def densify(workdir: str, window: str | tuple[int, int] | None = "auto", num: int = 32,
            curve: str | None = None, quiet: bool = False) -> dict[str, Any]:
  """Re-trains around each transition and saves dense checkpoints there (see module doc).

  Args:
    workdir: a trained workdir.
    window: 'auto' (around each run's transition of `curve`) or
      'START:END' / (start, end) in training sequences.
    num: dense checkpoints per window.
    curve: the metrics.csv curve whose transitions 'auto' finds (a curve
      spec as for `icldyn analyze --curve`; default: the task's first
      default curve, `fsl_train/loss` for the few-shot task).
    quiet: no progress lines.

  Returns:
    {'groups': [{group, windows, dense_steps (sequences), start, end,
    checked_metrics, checked_checkpoints}], 'saved': dense checkpoints
    written, 'seconds'}.

  Raises:
    ConfigError: bad arguments or workdir.
    NotReproduced: the re-run differs from what training stored.
  """
  t0 = time.time()
  wd = loader.open_workdir(workdir)
  plans = plan(wd, window, num, curve)
  groups = {pg.group.index: pg for pg in wd.prepared().groups}
  metrics = loader.read_metrics(wd.path)
  report, saved = [], 0
  for gp in plans:
    pg = groups[gp.group]
    staged, rows, checked = _rerun(wd, pg, gp, metrics, quiet)
    _commit(wd.path, gp.group, staged, rows)
    saved += len(staged)
    batch = pg.static.batch_size
    report.append({"group": gp.group, "windows": gp.windows,
                   "dense_steps": [t * batch for t in gp.dense], "start": gp.start * batch,
                   "end": gp.end * batch, "checked_metrics": checked[0],
                   "checked_checkpoints": checked[1]})
    if not quiet:
      print(f"[icldyn] densify g{gp.group}: re-ran {gp.start * batch}..{gp.end * batch} "
            f"sequences, reproduced {checked[0]} stored metric values and {checked[1]} "
            f"checkpoints exactly; saved {len(staged)} dense checkpoints in "
            f"{', '.join(f'{a}..{b}' for a, b in gp.windows)}", file=sys.stderr, flush=True)
  return {"groups": report, "saved": saved, "seconds": time.time() - t0}


def _runner_pieces(a: int, b: int, events: list[int], scan: int) -> list[tuple[int, int]]:
  """The training chunks [s, e) that `icldyn train` ran between steps a and b."""
  pieces, t = [], a
  for nxt in events:
    if nxt <= t:
      continue
    if nxt > b:
      break
    while t < nxt:
      n = min(scan, nxt - t)
      pieces.append((t, t + n))
      t += n
  return pieces


def _rerun(wd: loader.Workdir, pg: build.PreparedGroup, gp: GroupPlan, metrics, quiet: bool):
  """Re-trains one group and checks it against what training stored.

  Returns:
    (staged dense steps in sequences, metric rows to append,
    (metric values checked, checkpoints checked)).
  """
  g, static, cfg = pg.group, pg.static, pg.group.config
  batch = static.batch_size
  sched = group_lib.schedule(cfg, batch)
  evals, runner_events = set(sched.evals), sched.events
  # The programs exactly as the runner places and compiles them.
  placed = group_lib.Placed(pg)
  r, rp, props, table = placed.runs, placed.padded, placed.props, placed.table
  state = placed.initial_state()
  # Running sums of the `train` evaluator, as the runner keeps them.
  acc = group_lib.empty_accumulator(rp)
  t = 0
  if gp.start > 0:
    store = ckpt_lib.Store(wd.path, g.index, read_only=True)
    try:
      restored = store.restore_state(gp.start * batch, group_lib.resume_tree(state, acc, 0))
    finally:
      store.close()
    state = placed.shard(restored["state"])
    acc = group_lib.accumulator_of(restored)
    t = int(restored["t"])
  chunk_c, eval_c = placed.compile_training(state)

  staging = os.path.join(os.path.abspath(wd.path), wd_lib.CHECKPOINTS_DIR, f"g{g.index}", STAGING)
  shutil.rmtree(staging, ignore_errors=True)
  manager = ocp.CheckpointManager(staging, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False, create=True))
  stored = {s // batch for s in loader.stream_steps(wd.path, g.index) if s % batch == 0}
  store = ckpt_lib.Store(wd.path, g.index, read_only=True)
  dense = set(gp.dense)
  events = sorted(e for e in set(runner_events) | dense | stored if t < e <= gp.end)
  step_terms: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # step -> (loss [rp], grad norm [rp])
  last_eval = t
  checked = [0, 0]
  mismatches: list[str] = []
  new_rows: list[tuple] = []

  def evaluation(step: int) -> dict:
    out = jax.device_get(eval_c(state, props, table))
    if step == 0:
      return out
    # The runner adds one float64 sum per training chunk it ran, in order.
    for a, b in _runner_pieces(last_eval, step, runner_events, static.scan_steps):
      for name, j in (("loss", 0), ("grad_norm", 1)):
        acc[name] += np.sum(np.stack([step_terms[s][j] for s in range(a, b)]).astype(np.float64),
                            axis=0)
      acc["count"] += b - a
    if acc["count"] > 0:
      out["train"] = {"loss": acc["loss"] / acc["count"],
                      "grad_norm": acc["grad_norm"] / acc["count"]}
    return out

  def compare(step: int, out: dict) -> None:
    for ev in sorted(out):
      for m in sorted(out[ev]):
        vals = np.asarray(out[ev][m])
        for i, run in enumerate(g.runs):
          got = wd_lib.format_value(float(vals[i]))
          curve = metrics.get((ev, m), {}).get(run)
          hit = np.nonzero(curve.steps == step * batch)[0] if curve is not None else []
          if not len(hit):
            mismatches.append(f"{ev}/{m} of run {run} at {step * batch}: not in metrics.csv")
            continue
          want = wd_lib.format_value(float(curve.values[hit[-1]]))
          if want != got:
            mismatches.append(f"{ev}/{m} of run {run} at {step * batch}: stored {want}, "
                              f"re-run {got}")
          checked[0] += 1

  if t == 0:  # the runner evaluates at step 0 (and not again at a resume point)
    compare(0, evaluation(0))
  progress = group_lib.Progress(gp.end * batch, quiet, label=f" densify g{g.index}")
  for nxt in events:
    while t < nxt:
      n = min(static.scan_steps, nxt - t)
      state, (ls, gs) = chunk_c(state, props, table, t, n)
      ls, gs = jax.device_get((ls, gs))
      for i in range(n):
        step_terms[t + i] = (ls[i], gs[i])
      t += n
      progress.update(t * batch, None)
    if t in evals:
      compare(t, evaluation(t))
      acc = group_lib.empty_accumulator(rp)
      step_terms = {s: v for s, v in step_terms.items() if s >= t}
      last_eval = t
    params = None
    if t in stored or t in dense:
      params = jax.device_get(jax.tree.map(lambda x: x[:r], state.params))
    if t in stored:
      want = store.restore_params(t * batch)
      same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), want, params)
      if not all(jax.tree.leaves(same)):
        mismatches.append(f"stream checkpoint at {t * batch}: parameters differ")
      checked[1] += 1
    elif t in dense:
      manager.save(t * batch, args=ocp.args.StandardSave(params))
      manager.wait_until_finished()
      ckpt_lib.seal(os.path.join(staging, str(t * batch)))
      if t not in evals:
        out = jax.device_get(eval_c(state, props, table))
        for ev in sorted(out):
          for m in sorted(out[ev]):
            vals = np.asarray(out[ev][m])
            for i, run in enumerate(g.runs):
              new_rows.append((t * batch, run, ev, m, float(vals[i])))
  progress.update(t * batch, None, force=True)
  manager.close()
  store.close()
  if mismatches:
    shutil.rmtree(staging, ignore_errors=True)
    shown = "; ".join(mismatches[:5]) + (f" (+{len(mismatches) - 5} more)"
                                         if len(mismatches) > 5 else "")
    raise NotReproduced(f"group {g.index}: the re-run does not reproduce the stored run: {shown}")
  staged = sorted(s * batch for s in dense if s not in stored)
  return staged, new_rows, tuple(checked)


def _commit(workdir: str, group: int, staged: Sequence[int], rows: list[tuple]) -> None:
  """Moves staged checkpoints into the stream and appends the dense evaluations."""
  base = os.path.join(os.path.abspath(workdir), wd_lib.CHECKPOINTS_DIR, f"g{group}")
  staging, stream_dir = os.path.join(base, STAGING), os.path.join(base, "stream")
  os.makedirs(stream_dir, exist_ok=True)
  for step in staged:
    src, dst = os.path.join(staging, str(step)), os.path.join(stream_dir, str(step))
    if os.path.isdir(src) and not os.path.exists(dst):
      os.replace(src, dst)
  shutil.rmtree(staging, ignore_errors=True)
  if rows:
    wd_lib.MetricsFile(os.path.join(workdir, wd_lib.METRICS_CSV)).append(rows)
