"""The host loop of `icldyn train`: validate, write the workdir, train each group, resume.

Order of work: the whole grid is expanded and validated, every group's data
table is built and every clamp plan made before anything is written, so a
bad input leaves no trace. Then each compile group is trained by chunks
between host events (evaluation, stream checkpoint, resume checkpoint).

Resume: a workdir holding the same resolved config continues from each
group's newest resume checkpoint; rows of `metrics.csv` past that point are
dropped, so the finished workdir equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from icldyn import checkpoint as ckpt_lib
from icldyn import clamps as clamps_lib
from icldyn import config as config_lib
from icldyn import data as data_lib
from icldyn import grid as grid_lib
from icldyn import sharding as sharding_lib
from icldyn import train as train_lib
from icldyn import workdir as wd_lib
from icldyn.config import ConfigError

log = logging.getLogger(__name__)


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after writing a resume checkpoint."""


@dataclasses.dataclass
class PreparedGroup:
  group: grid_lib.Group
  static: train_lib.Static
  props: train_lib.Props
  table: data_lib.Table


@dataclasses.dataclass
class Prepared:
  """A validated grid, ready to train; nothing written yet."""
  config: Any
  axes: list[str]
  fields: list[str]
  groups: list[PreparedGroup]
  num_runs: int

  def resolved(self) -> dict:
    """What config.json holds: the base config and the grid axes."""
    return {"config": json.loads(config_lib.to_json(self.config)), "grid": list(self.axes)}


def prepare(cfg, axes: list[str] | None = None) -> Prepared:
  """Expands, validates and builds every group of a grid (raises ConfigError)."""
  axes = list(axes) if axes else list(cfg.grid)
  runs = grid_lib.expand(cfg, axes)
  if not runs:
    raise ConfigError("--grid", "the grid is empty")
  fields = grid_lib.grid_fields(cfg, axes)
  groups = []
  for g in grid_lib.make_groups(runs, fields):
    plan, clamp_params, eval_plans = clamps_lib.plans_for_group(g.config, g.settings)
    static = train_lib.build_static(g.config, plan, eval_plans)
    props = train_lib.build_props(g.settings, g.config, clamp_params)
    table = data_lib.make_table(g.config, g.config.data.num_train_classes, g.config.data.num_labels)
    groups.append(PreparedGroup(g, static, props, table))
  return Prepared(config=cfg, axes=axes, fields=fields, groups=groups, num_runs=len(runs))


def _diff_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff_fields(old.get(k), new.get(k), f"{prefix}{k}.")
    return out
  return [] if old == new else [prefix.rstrip(".")]


def check_workdir(workdir: str, prepared: Prepared, overwrite: bool) -> bool:
  """Checks the workdir; returns True when it holds this grid (resume).

  Raises ConfigError for a file in the way, an unwritable directory, or a
  different config (unless `overwrite`, which clears the workdir).
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError("--workdir", f"{workdir} exists and is not a directory")
  parent = os.path.dirname(os.path.abspath(workdir))
  target = workdir if os.path.isdir(workdir) else parent
  while not os.path.exists(target):
    target = os.path.dirname(target)
  if not os.access(target, os.W_OK | os.X_OK):
    raise ConfigError("--workdir", f"{target} is not writable")
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    return False
  with open(cfg_path) as f:
    old = json.load(f)
  diff = _diff_fields(old, prepared.resolved())
  if not diff:
    return True
  if overwrite:
    shutil.rmtree(workdir)
    return False
  shown = ", ".join(diff[:8]) + (f" (+{len(diff) - 8} more)" if len(diff) > 8 else "")
  raise ConfigError("--workdir", f"{workdir} holds a different config (differs in: {shown}); "
                    "use another workdir or --overwrite")


def run_rows(prepared: Prepared, status: dict[int, tuple[str, int]] | None = None) -> list[dict]:
  """The rows of runs.csv."""
  rows = []
  for pg in prepared.groups:
    for gi, (run, settings) in enumerate(zip(pg.group.runs, pg.group.settings)):
      st, dstep = (status or {}).get(run, ("pending", -1))
      row = {"run": run, "group": pg.group.index, "group_index": gi}
      row.update({k: v for k, v in settings.items()})
      row.update(clamps_lib.describe(settings))
      row["status"] = st
      row["diverged_step"] = dstep if dstep >= 0 else ""
      rows.append(row)
  return rows


class _StopFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks between chunks."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading_main():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def threading_main() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _compile(fn, *args, opt_level: int | None = None):
  """AOT-compiles a jitted function (optionally at a lower XLA optimisation level)."""
  options = {} if opt_level is None else {"xla_backend_optimization_level": opt_level}
  return fn.lower(*args).compile(compiler_options=options)


def train(cfg, workdir: str, axes: list[str] | None = None, quiet: bool = False,
          overwrite: bool = False) -> dict:
  """Trains a grid into `workdir` (resuming if it holds the same grid).

  Args:
    cfg: the study config (after command-line overrides).
    workdir: output directory.
    axes: grid axes from the command line (replace the study's own grid).
    quiet: no progress lines.
    overwrite: replace a workdir that holds a different config.

  Returns:
    Summary dict: num_runs, diverged (list of run indices), workdir, seconds.

  Raises:
    ConfigError: bad input (nothing written).
    Preempted: stopped by a signal after saving a resume checkpoint.
  """
  sharding_lib.maybe_initialize_distributed()
  prepared = prepare(cfg, axes)
  resuming = check_workdir(workdir, prepared, overwrite)
  os.makedirs(workdir, exist_ok=True)
  if not resuming:
    wd_lib.write_json(os.path.join(workdir, "config.json"), prepared.resolved())
  status: dict[int, tuple[str, int]] = {}
  wd_lib.write_runs(os.path.join(workdir, "runs.csv"), run_rows(prepared, _read_status(workdir)))
  metrics = wd_lib.MetricsFile(os.path.join(workdir, "metrics.csv"))
  tb = wd_lib.TensorBoard(os.path.join(workdir, "tb"))
  t0 = time.time()
  try:
    with _StopFlag() as stop:
      for pg in prepared.groups:
        status.update(_train_group(pg, prepared, workdir, metrics, tb, quiet, stop))
        wd_lib.write_runs(os.path.join(workdir, "runs.csv"),
                          run_rows(prepared, {**_read_status(workdir), **status}))
  finally:
    tb.close()
  diverged = sorted(r for r, (s, _) in status.items() if s == "diverged")
  return {"num_runs": prepared.num_runs, "diverged": diverged, "workdir": workdir,
          "seconds": time.time() - t0}


def _read_status(workdir: str) -> dict[int, tuple[str, int]]:
  path = os.path.join(workdir, "runs.csv")
  if not os.path.exists(path):
    return {}
  out = {}
  for r in wd_lib.read_csv(path):
    d = r.get("diverged_step") or "-1"
    out[int(r["run"])] = (r.get("status", "pending"), int(d))
  return out


def _train_group(pg: PreparedGroup, prepared: Prepared, workdir: str,
                 metrics: wd_lib.MetricsFile, tb: wd_lib.TensorBoard, quiet: bool,
                 stop: _StopFlag) -> dict[int, tuple[str, int]]:
  g, static = pg.group, pg.static
  cfg = g.config
  mesh = sharding_lib.run_mesh()
  r = len(g.runs)
  rp = sharding_lib.padded_count(r, mesh)
  props = sharding_lib.shard_runs(sharding_lib.pad_runs(pg.props, r, rp), mesh)
  table = sharding_lib.replicate(pg.table, mesh)
  batch = static.batch_size
  total = -(-cfg.train.num_sequences // batch)
  evals = train_lib.eval_steps(total, batch, cfg.train.eval_every)
  ckpts = ckpt_lib.schedule(cfg.train.num_sequences, cfg.checkpoint.every,
                            config_lib.checkpoint_sequences(cfg), cfg.checkpoint.log_num, batch)
  resumes = ([] if cfg.checkpoint.resume_every <= 0 else
             ckpt_lib.schedule(cfg.train.num_sequences, cfg.checkpoint.resume_every, [], 0, batch))
  resumes = sorted(set(resumes) | {total})
  events = sorted(set(evals) | set(ckpts) | set(resumes))
  label = f" g{g.index + 1}/{len(prepared.groups)}" if len(prepared.groups) > 1 else ""

  tc = time.time()
  init, chunk, evaluate = train_lib.make_programs(static, mesh)
  init_c = _compile(init, props, opt_level=0)  # runs once: compile fast rather than run fast
  state = init_c(props)
  store = ckpt_lib.Store(workdir, g.index)
  t = 0
  acc = {"loss": np.zeros(rp), "grad_norm": np.zeros(rp), "count": 0}
  saved = store.resume_steps()
  if saved:
    step_seqs = saved[-1]
    like = {"state": jax.device_get(state), "acc_loss": acc["loss"], "acc_grad_norm": acc["grad_norm"],
            "acc_count": np.int64(0), "t": np.int64(0)}
    restored = store.restore_state(step_seqs, like)
    state = sharding_lib.shard_runs(restored["state"], mesh)
    acc = {"loss": np.asarray(restored["acc_loss"]), "grad_norm": np.asarray(restored["acc_grad_norm"]),
           "count": int(restored["acc_count"])}
    t = int(restored["t"])
    metrics.truncate_after(set(g.runs), t * batch)
    if not quiet:
      print(f"[icldyn]{label} resuming at {t * batch} sequences", file=sys.stderr, flush=True)
  chunk_c = _compile(chunk, state, props, table, 0, 1)
  eval_c = _compile(evaluate, state, props, table)
  if not quiet:
    print(f"[icldyn]{label} {r} runs ({rp - r} padding) on {mesh.devices.size} device(s), "
          f"compiled in {time.time() - tc:.1f}s", file=sys.stderr, flush=True)
  progress = train_lib.Progress(cfg.train.num_sequences, quiet, label=label)
  last_loss = None

  def do_events(t):
    nonlocal last_loss
    if t in evals and not (saved and t == int(restored["t"]) and t > 0):
      rows = []
      out = jax.device_get(eval_c(state, props, table))
      if t > 0 and acc["count"] > 0:
        out["train"] = {"loss": acc["loss"] / acc["count"],
                        "grad_norm": acc["grad_norm"] / acc["count"]}
        acc["loss"][:] = 0
        acc["grad_norm"][:] = 0
        acc["count"] = 0
      for ev in sorted(out):
        for m in sorted(out[ev]):
          vals = np.asarray(out[ev][m])
          for i, run in enumerate(g.runs):
            v = float(vals[i])
            rows.append((t * batch, run, ev, m, v))
            tb.scalar(run, f"{ev}/{m}", v, t * batch)
      metrics.append(rows)
      if "fsl_train" in out:
        last_loss = float(np.mean(np.asarray(out["fsl_train"]["loss"])[:r]))
    if t in ckpts and t > 0:
      store.save_params(t * batch, jax.tree.map(lambda x: x[:r], state.params))
    if t in resumes and t > 0:
      _save_resume(store, t, batch, state, acc)

  do_events(t)
  progress.update(t * batch, last_loss)
  for nxt in events:
    if nxt <= t:
      continue
    while t < nxt:
      n = min(static.scan_steps, nxt - t)
      state, (losses, gnorms) = chunk_c(state, props, table, t, n)
      losses, gnorms = jax.device_get((losses, gnorms))
      acc["loss"] += np.sum(losses[:n].astype(np.float64), axis=0)
      acc["grad_norm"] += np.sum(gnorms[:n].astype(np.float64), axis=0)
      acc["count"] += n
      t += n
      progress.update(t * batch, last_loss)
      if stop.signum is not None and t < nxt:
        _save_resume(store, t, batch, state, acc)
        store.close()
        raise Preempted(f"stopped by signal {stop.signum} at {t * batch} sequences")
    do_events(t)
    if stop.signum is not None and t < total:
      if t not in resumes:
        _save_resume(store, t, batch, state, acc)
      store.close()
      raise Preempted(f"stopped by signal {stop.signum} at {t * batch} sequences")
  progress.update(t * batch, last_loss, force=True)
  store.close()
  div = jax.device_get((state.diverged, state.diverged_step))
  out = {}
  for i, run in enumerate(g.runs):
    out[run] = ("diverged", int(div[1][i]) * batch) if div[0][i] else ("done", -1)
  return out


def _save_resume(store: ckpt_lib.Store, t: int, batch: int, state, acc) -> None:
  store.save_state(t * batch, {"state": jax.device_get(state), "acc_loss": acc["loss"],
                               "acc_grad_norm": acc["grad_norm"],
                               "acc_count": np.int64(acc["count"]), "t": np.int64(t)})
