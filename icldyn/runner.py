"""The host loop of `icldyn train`: check the workdir, write it, train each group, resume.

Order of work: the whole grid is expanded and validated, every group's data
table is built, every clamp plan made and the workdir checked before anything
is written, so a bad input leaves no trace. Then each compile group is
trained by chunks between host events (evaluation, stream checkpoint,
resume checkpoint).

Reliability (docs/bad_inputs.md, tests/test_reliability.py):
- Resume. A workdir holding the same resolved config continues each group
  from its newest intact resume checkpoint (a damaged one is reported with
  its step and path, set aside, and the previous one used). Rows of
  `metrics.csv` and stream checkpoints past that step are dropped and
  redone, so the finished workdir equals an uninterrupted run's.
- Crash safety. Files are replaced atomically, metrics appended with fsync,
  checkpoints renamed into place when complete; TensorBoard writers are
  flushed before each resume checkpoint. A kill at any instant leaves the
  workdir resumable.
- Signals. The first SIGTERM/SIGINT stops training after the current chunk
  with a resume checkpoint (`Preempted`); a second one stops at once.
- Disk full / unwritable: `WorkdirError`, the checkpoints written before intact.
- One process per workdir: an flock on `DIR/.lock`.
- Several processes (`icldyn.distributed`): every process steps the runs on
  its own devices; they agree between chunks whether to stop, and process 0
  alone writes the workdir, from values gathered at events.

Running ahead. JAX dispatches asynchronously, so the loop sends chunk k+1 to
the devices before it reads chunk k's results (losses, evaluation,
checkpointed state) and writes them; the host's work then overlaps the
device's. Nothing the loop decides depends on chunk k's results: chunk
boundaries come from the event schedule, the divergence guard runs on the
device, and the stop flag is agreed before each chunk is sent, as before.
What an event at chunk k's end reads from the state (the evaluation, a copy
of the state for a checkpoint) is sent before chunk k+1, which donates the
state's buffers. Checkpoint saves run in orbax's background thread
(`icldyn.store.checkpoints`) and are sealed before the next event is written
(so callbacks come in step order), at the end of the group and before a
preemption exits. The results are the same programs on the same inputs, so
bitwise those of a loop that waits (tests/test_train.py).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

from icldyn import build
from icldyn import clamps as clamps_lib
from icldyn import config as config_lib
from icldyn import distributed
from icldyn import faults
from icldyn import group as group_lib
from icldyn import sharding as sharding_lib
from icldyn.errors import ConfigError
from icldyn.store import checkpoints as ckpt_lib
from icldyn.store import files as wd_lib

log = logging.getLogger(__name__)


# `ICLDYN_RUN_AHEAD=0` reads each chunk's results before the next chunk is sent
# (the loop before run-ahead; same results bitwise), for timing and comparison.
RUN_AHEAD_ENV = "ICLDYN_RUN_AHEAD"


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after writing a resume checkpoint."""


@dataclasses.dataclass(frozen=True)
class TrainingEvent:
  """What a training callback receives (on process 0, from the host loop).

  Attributes:
    kind: 'evaluation', 'checkpoint' or 'group_end'.
    group: the compile group.
    step: training sequences seen.
    runs: the group's run indices.
    metrics: for an evaluation, {run: {"evaluator/metric": value}} as
      written to metrics.csv.
    path: for a checkpoint, the stream checkpoint's directory.
    status: for a group's end, {run: (status, diverged sequences or -1)}.
  """
  kind: str
  group: int
  step: int
  runs: tuple[int, ...]
  metrics: dict[int, dict[str, float]] | None = None
  path: str | None = None
  status: dict[int, tuple[str, int]] | None = None


class Callbacks:
  """Host-side hooks on training events, for logging elsewhere (a base to subclass;
  any object with some of these methods will do). They run on process 0 after
  the event is written to the workdir; one that raises is logged with its
  traceback and training goes on."""

  def on_evaluation(self, event: TrainingEvent) -> None:
    """After each evaluation's metrics are written."""

  def on_checkpoint(self, event: TrainingEvent) -> None:
    """After each stream checkpoint is written and sealed (orbax writes it in the
    background; this runs before the next event's callbacks)."""

  def on_group_end(self, event: TrainingEvent) -> None:
    """After a compile group has trained (or was already done)."""


class _Hooks:
  """The user's callbacks, called safely (process 0 only)."""

  def __init__(self, callbacks):
    if callbacks is None:
      callbacks = []
    elif not isinstance(callbacks, (list, tuple)):
      callbacks = [callbacks]
    self.callbacks = list(callbacks) if distributed.is_primary() else []

  def emit(self, method: str, event: TrainingEvent) -> None:
    for cb in self.callbacks:
      fn = getattr(cb, method, None)
      if fn is None:
        continue
      try:
        fn(event)
      except Exception:  # a logger's failure must not stop the grid
        log.exception("callback %s.%s failed at %d sequences; training goes on",
                      type(cb).__name__, method, event.step)


class WorkdirError(Exception):
  """The workdir could not be written during training (disk full, permissions, ...).

  Everything written before (checkpoints, metrics) is intact; the same
  command resumes once the cause is fixed.
  """


# --------------------------------------------------------------------------
# The workdir: checks (read-only), lock, clearing.


def _diff_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff_fields(old.get(k), new.get(k), f"{prefix}{k}.")
    return out
  return [] if old == new else [prefix.rstrip(".")]


def _with_defaults(resolved: dict) -> dict:
  """A stored config.json with fields added since it was written set to their defaults
  (`task.name`: a workdir from before tasks existed trained the few-shot task)."""
  try:
    cfg, axes = config_lib.from_json(resolved)
  except (KeyError, TypeError, ValueError):
    return {"config": resolved.get("config"), "grid": resolved.get("grid")}
  return {"config": json.loads(config_lib.to_json(cfg)), "grid": axes}


def _ours(name: str) -> bool:
  base, mark, pid = name.rpartition(wd_lib.TMP_MARK)
  return name in wd_lib.ENTRIES or bool(mark and base in wd_lib.ENTRIES and pid.isdigit())


def check_workdir(workdir: str, prepared: build.Prepared, overwrite: bool) -> bool:
  """Checks the workdir without changing it; returns True when it holds this grid (resume).

  Raises:
    ConfigError: the path is or lies under a file, is not writable (or on a
      read-only file system), holds someone else's files, or holds a
      different (or unreadable) config.json, unless `overwrite`.
  """
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError("--workdir", f"{workdir} exists and is not a directory")
  target = path
  while not os.path.exists(target):
    target = os.path.dirname(target)
  if not os.path.isdir(target):
    raise ConfigError("--workdir", f"{target} is a file, so {workdir} cannot be created")
  if not os.access(target, os.W_OK | os.X_OK):
    raise ConfigError("--workdir", f"{target} is not writable")
  if os.statvfs(target).f_flag & os.ST_RDONLY:
    raise ConfigError("--workdir", f"{target} is on a read-only file system")
  if target != path:
    return False
  cfg_path = os.path.join(path, wd_lib.CONFIG_JSON)
  if not os.path.exists(cfg_path):
    foreign = sorted(n for n in os.listdir(path) if not _ours(n))
    if foreign:
      shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
      raise ConfigError("--workdir", f"{workdir} is not empty and is not an icldyn workdir "
                        f"(holds {shown}); use a new or empty directory")
    return False  # empty, or leftovers of an interrupted start / --overwrite: start afresh
  try:
    with open(cfg_path) as f:
      old = json.load(f)
    if not isinstance(old, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    if overwrite:
      return False
    raise ConfigError("--workdir", f"{cfg_path} is unreadable ({e}); "
                      "use another workdir or --overwrite") from None
  new = prepared.resolved()
  diff = _diff_fields(_with_defaults(old), {"config": new["config"], "grid": new["grid"]})
  if not diff:
    return True
  if overwrite:
    return False
  shown = ", ".join(diff[:8]) + (f" (+{len(diff) - 8} more)" if len(diff) > 8 else "")
  raise ConfigError("--workdir", f"{workdir} holds a different config (differs in: {shown}); "
                    "use another workdir or --overwrite")


class _Lock:
  """An exclusive flock on DIR/.lock for the duration of training (creates DIR)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, wd_lib.LOCK)
    self.fd = None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      other = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
      os.close(self.fd)
      self.fd = None
      raise ConfigError("--workdir", f"{os.path.dirname(self.path)} is in use by another "
                        f"icldyn process (pid {other})") from None
    os.ftruncate(self.fd, 0)
    os.pwrite(self.fd, str(os.getpid()).encode(), 0)
    return self

  def __exit__(self, *exc):
    if self.fd is not None:
      os.close(self.fd)  # releases the flock
      self.fd = None


def _clear_workdir(workdir: str) -> None:
  """Removes what an earlier icldyn run wrote (config.json first: the workdir is then "new")."""
  cfg_path = os.path.join(workdir, wd_lib.CONFIG_JSON)
  if os.path.exists(cfg_path):
    os.remove(cfg_path)
    wd_lib.fsync_dir(workdir)
  for name in os.listdir(workdir):
    p = os.path.join(workdir, name)
    if name != wd_lib.LOCK and _ours(name):
      shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def run_rows(prepared: build.Prepared, status: dict[int, tuple[str, int]] | None = None) -> list[dict]:
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


def _read_status(workdir: str) -> dict[int, tuple[str, int]]:
  path = os.path.join(workdir, wd_lib.RUNS_CSV)
  if not os.path.exists(path):
    return {}
  out = {}
  for r in wd_lib.read_csv(path):
    d = r.get("diverged_step") or "-1"
    out[int(r["run"])] = (r.get("status", "pending"), int(d))
  return out


# --------------------------------------------------------------------------
# Signals.


class _StopFlag:
  """Turns the first SIGTERM/SIGINT into a flag the loop checks between chunks.

  A second signal kills the process at once, as if it were not handled (the
  workdir stays resumable, as after any kill).
  """

  def __init__(self):
    self.signum = None
    self.agreed = None  # the signal every process agreed on at the last `sync`
    self._old = {}

  def __enter__(self):
    if threading_main():  # signal handlers can only be set from the main thread
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.signum is not None:  # die by the signal, as if uncaught (a kill is safe)
      log.warning("%s again: stopping at once", name)
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    log.warning("%s: stopping after the current chunk with a resume checkpoint "
                "(send it again to stop at once)", name)

  def _restore(self):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}

  def __exit__(self, *exc):
    self._restore()

  def sync(self) -> bool:
    """Whether to stop now; with several processes, the same answer on every one
    (a signal to any process stops them all at the same step)."""
    self.agreed = distributed.first_signal(self.signum)
    return self.agreed is not None

  def preempted(self, where: str, saved: bool = True) -> Preempted:
    signum = self.agreed if self.agreed is not None else self.signum
    return Preempted(f"stopped by {signal.Signals(signum).name} {where}"
                     + (", after writing a resume checkpoint" if saved else ""))


def threading_main() -> bool:
  return threading.current_thread() is threading.main_thread()


class _Elsewhere:
  """Stands in for a workdir writer (metrics, TensorBoard, checkpoints) on processes
  other than process 0, which writes the workdir alone: every call does nothing."""

  def __getattr__(self, name):
    return lambda *args, **kwargs: None


# --------------------------------------------------------------------------
# Training.


def train(cfg, workdir: str, axes: list[str] | None = None, quiet: bool = False,
          overwrite: bool = False, callbacks=None) -> dict:
  """Trains a grid into `workdir` (resuming if it holds the same grid).

  Args:
    cfg: the study config (after command-line overrides).
    workdir: output directory.
    axes: grid axes from the command line (replace the study's own grid).
    quiet: no progress lines.
    overwrite: replace a workdir that holds a different config.
    callbacks: a `Callbacks` (or any object with some of its methods), or a
      list of them, called on process 0 at each evaluation, stream
      checkpoint and group end.

  Returns:
    Summary dict: num_runs, diverged (list of run indices), diverged_steps
    ({run: sequences}), workdir, seconds.

  Raises:
    ConfigError: bad input (nothing written).
    Preempted: stopped by a signal after saving a resume checkpoint.
    WorkdirError: the workdir could not be written (earlier checkpoints intact).
    distributed.PeerLost: another process of a multi-process grid stopped
      (the workdir is resumable).
  """
  distributed.initialize()
  quiet = quiet or not distributed.is_primary()  # one progress line, process 0's
  t0 = time.time()
  status: dict[int, tuple[str, int]] = {}
  with _StopFlag() as stop:
    prepared = build.prepare(cfg, axes)
    # Process 0 checks the workdir (the others may not see it); every process
    # gets its verdict, or the same error, after comparing configs.
    resuming = distributed.agree_start(lambda: check_workdir(workdir, prepared, overwrite),
                                       prepared.resolved())
    if stop.sync():
      raise stop.preempted("before training began", saved=False)
    try:
      with _Lock(workdir):
        _train_all(prepared, workdir, resuming, quiet, stop, status, _Hooks(callbacks))
    except OSError as e:
      if isinstance(e, ckpt_lib.CheckpointWriteError):
        what = str(e)
      else:
        why = f"[Errno {e.errno}] {e.strerror}" if e.errno else str(e)
        what = f"cannot write to {e.filename or workdir}: {why}"
      raise WorkdirError(f"{what}; everything written before is intact: free space or fix "
                         "permissions, then run the same command to resume") from e
  diverged = sorted(r for r, (s, _) in status.items() if s == "diverged")
  if diverged and not quiet:
    log.warning("%d of %d runs diverged (run: sequences) %s; runs.csv marks them", len(diverged),
                prepared.num_runs, ", ".join(f"{r}: {status[r][1]}" for r in diverged))
  return {"num_runs": prepared.num_runs, "diverged": diverged,
          "diverged_steps": {r: status[r][1] for r in diverged}, "workdir": workdir,
          "seconds": time.time() - t0}


def _train_all(prepared: build.Prepared, workdir: str, resuming: bool, quiet: bool, stop: _StopFlag,
               status: dict[int, tuple[str, int]], hooks: _Hooks) -> None:
  """Writes the workdir's files and trains every group, filling `status` per run.

  Only process 0 writes; the other processes train their runs beside it.
  """
  primary = distributed.is_primary()
  runs_path = os.path.join(workdir, wd_lib.RUNS_CSV)
  if primary:
    wd_lib.remove_stale_tmp(workdir)
    if not resuming:
      _clear_workdir(workdir)
      wd_lib.write_json(os.path.join(workdir, wd_lib.CONFIG_JSON), prepared.resolved())
    wd_lib.write_runs(runs_path, run_rows(prepared, _read_status(workdir)))
    metrics = wd_lib.MetricsFile(os.path.join(workdir, wd_lib.METRICS_CSV))
    tb = wd_lib.TensorBoard(os.path.join(workdir, wd_lib.TB_DIR))
  else:
    metrics = tb = _Elsewhere()
  try:
    for pg in prepared.groups:
      if stop.sync():
        raise stop.preempted(f"before group {pg.group.index + 1}/{len(prepared.groups)}",
                             saved=False)
      done = _train_group(pg, prepared, workdir, metrics, tb, quiet, stop, hooks)
      status.update(done)
      hooks.emit("on_group_end", TrainingEvent(
          "group_end", pg.group.index, pg.static.batch_size * group_lib.schedule(
              pg.group.config, pg.static.batch_size).total, tuple(pg.group.runs), status=done))
      if primary:
        wd_lib.write_runs(runs_path, run_rows(prepared, {**_read_status(workdir), **status}))
  finally:
    try:
      tb.close()
    except OSError:
      pass  # already failing; the first error is the one to report


def _restore(store: ckpt_lib.Store, like: dict, label: str) -> dict | None:
  """The newest intact resume state of a group (or None), reporting damaged ones.

  `like` has the group's runs unpadded; a state written padded (before resume
  states were stored unpadded) is trimmed to them.
  """
  try:
    step, restored, damaged = store.restore_latest_state(like, trim_runs=True)
  except ckpt_lib.CheckpointMismatch as e:
    raise ConfigError("--workdir", f"{e}; resume with the icldyn version that wrote it, or "
                      "start over with --overwrite") from e
  for err, moved in damaged:
    log.warning("%s; set aside as %s", err, moved)
  if damaged:
    log.warning("%s", f"{label.strip() or 'grid'}: falling back to the newest intact resume "
                f"checkpoint, step {step}" if restored is not None else
                f"{label.strip() or 'grid'}: no intact resume checkpoint left, starting over")
  return restored


def _train_group(pg: build.PreparedGroup, prepared: build.Prepared, workdir: str,
                 metrics: wd_lib.MetricsFile, tb: wd_lib.TensorBoard, quiet: bool,
                 stop: _StopFlag, hooks: _Hooks) -> dict[int, tuple[str, int]]:
  """Trains (or resumes) one compile group; returns {run: (status, diverged sequences)}."""
  g = pg.group

  def sealed(kind: str, step: int, path: str) -> None:
    if kind == "stream":
      hooks.emit("on_checkpoint", TrainingEvent("checkpoint", g.index, step, tuple(g.runs),
                                                path=path))

  store = (ckpt_lib.Store(workdir, g.index, on_sealed=sealed) if distributed.is_primary()
           else _Elsewhere())
  try:
    done = _GroupRun(pg, prepared, store, metrics, tb, quiet, stop, hooks).run()
  except BaseException:
    store.close(abandon=True)  # the first error is the one to report
    raise
  store.close()  # seals the last save
  return done


class _GroupRun:
  """The host loop of one group: chunks of steps between events, resume, preemption."""

  def __init__(self, pg: build.PreparedGroup, prepared: build.Prepared, store: ckpt_lib.Store,
               metrics: wd_lib.MetricsFile, tb: wd_lib.TensorBoard, quiet: bool, stop: _StopFlag,
               hooks: _Hooks):
    self.g, self.static, self.hooks = pg.group, pg.static, hooks
    self.store, self.metrics, self.tb, self.quiet, self.stop = store, metrics, tb, quiet, stop
    self.placed = group_lib.Placed(pg)
    self.r, self.rp = self.placed.runs, self.placed.padded
    self.batch = self.static.batch_size
    self.sched = group_lib.schedule(self.g.config, self.batch)
    self.total = self.sched.total
    self.evals, self.ckpts = set(self.sched.evals), set(self.sched.ckpts)
    self.resumes = set(self.sched.resumes)
    self.events = self.sched.events
    self.headline = group_lib.headline(self.g.config)
    self.label = f" g{self.g.index + 1}/{len(prepared.groups)}" if len(prepared.groups) > 1 else ""
    self.last_loss = None
    self.saved_at = None  # the step of the newest resume checkpoint of this state

  def run(self) -> dict[int, tuple[str, int]]:
    tc = time.time()
    self.state = self.placed.initial_state()
    self.owner = distributed.owners(self.state.diverged)  # the process stepping each run
    self.acc = group_lib.empty_accumulator(self.rp)
    t = 0
    # Everything up to and including a resume checkpoint's step was written
    # before it; everything after is dropped here and redone. Resume states
    # hold the runs unpadded, so any device or process count can resume them:
    # process 0 reads it and hands it to the others.
    like = group_lib.resume_tree(
        jax.tree.map(lambda x: np.zeros((self.r,) + x.shape[1:], x.dtype), self.state),
        group_lib.empty_accumulator(self.r), 0)
    restored = _restore(self.store, like, self.label) if distributed.is_primary() else None
    restored = distributed.broadcast_tree(restored, like)
    if restored is not None:
      self.state = self.placed.shard(sharding_lib.pad_runs(restored["state"], self.r, self.rp))
      acc = group_lib.accumulator_of(restored)
      padded = sharding_lib.pad_runs({"loss": acc["loss"], "grad_norm": acc["grad_norm"]},
                                     self.r, self.rp)
      self.acc = {**padded, "count": acc["count"]}
      t = self.saved_at = int(restored["t"])
    kept = t * self.batch if t > 0 else -1
    self.metrics.truncate_after(set(self.g.runs), kept)
    self.store.drop_stream_after(max(kept, 0))
    self.tb.resume(self.g.runs, kept + 1)
    if t > 0 and not self.quiet:
      print(f"[icldyn]{self.label} resuming at {t * self.batch} sequences", file=sys.stderr,
            flush=True)
    if t < self.total:
      self.chunk_c, self.eval_c = self.placed.compile_training(self.state)
      if not self.quiet:
        print(f"[icldyn]{self.label} {self.r} runs ({self.rp - self.r} padding) on "
              f"{self.placed.mesh.devices.size} device(s), compiled in {time.time() - tc:.1f}s",
              file=sys.stderr, flush=True)
      self._loop(t)
    div = distributed.to_host((self.state.diverged, self.state.diverged_step))
    return {run: ("diverged", int(div[1][i]) * self.batch) if div[0][i] else ("done", -1)
            for i, run in enumerate(self.g.runs)}

  def _loop(self, t: int) -> None:
    """Trains from step t to the end, sending each chunk before reading the previous one."""
    progress = group_lib.Progress(self.g.config.train.num_sequences, self.quiet, label=self.label,
                                  headline=" ".join(self.headline))
    if self.saved_at is None:  # a restored state's events were done before its checkpoint
      self._finish_events(t, self._start_events(t))
    progress.update(t * self.batch, self.last_loss)
    events = iter(e for e in self.events if e > t)
    nxt = next(events, None)
    run_ahead = os.environ.get(RUN_AHEAD_ENV, "1") != "0"

    def finish(chunk):
      self._finish_chunk(*chunk)
      progress.update(chunk[0] * self.batch, self.last_loss)

    pending = None  # the chunk sent and not yet read: (end step, n, outputs, its events)
    while True:
      sent = None
      # The stop flag is agreed before each chunk is sent (every process at the
      # same point), never after the last.
      if nxt is not None and not self.stop.sync():
        n = min(self.static.scan_steps, nxt - t)
        self.state, out = self.chunk_c(self.state, self.placed.props, self.placed.table, t, n)
        t += n
        faults.hit("after_chunk")
        # What the events at t read from the state is sent now, before the next
        # chunk donates its buffers.
        sent = (t, n, out, self._start_events(t) if t == nxt else None)
        if t == nxt:
          nxt = next(events, None)
      if pending is not None:  # runs while the chunk just sent computes
        finish(pending)
      pending = sent
      if pending is not None and not run_ahead:  # the waiting loop: read it before the next
        finish(pending)
        pending = None
      elif pending is None:
        break
    if nxt is not None:  # stopped by a signal
      if t > 0 and self.saved_at != t:
        self._save_resume(t)
      self.store.wait()  # the resume checkpoint sealed before the exit
      raise self.stop.preempted(f"at {t * self.batch} sequences", saved=t > 0)
    progress.update(t * self.batch, self.last_loss, force=True)

  def _finish_chunk(self, t: int, n: int, out, started: dict | None) -> None:
    """Reads a chunk's losses into the running sums, then writes the events at its end (t)."""
    losses, gnorms = out
    # This process's runs only: the sums of the others' stay with them until an event.
    losses, gnorms = distributed.local_part(losses), distributed.local_part(gnorms)
    self.acc["loss"] = self.acc["loss"] + np.sum(losses[:n].astype(np.float64), axis=0)
    self.acc["grad_norm"] = self.acc["grad_norm"] + np.sum(gnorms[:n].astype(np.float64), axis=0)
    self.acc["count"] += n
    if started is not None:
      self._finish_events(t, started)

  def _start_events(self, t: int) -> dict:
    """Sends what the events at step t read from the current state (evaluation, a
    copy of the state to checkpoint); `_finish_events` reads and writes it."""
    started = {}
    if t in self.evals:
      started["eval"] = distributed.to_host_later(
          self.eval_c(self.state, self.placed.props, self.placed.table))
    if t > 0 and t in self.resumes:
      started["state"] = distributed.to_host_later(self.state)
    elif t > 0 and t in self.ckpts:
      started["params"] = distributed.to_host_later(self.state.params)
    return started

  def _finish_events(self, t: int, started: dict) -> None:
    """Evaluation, then stream checkpoint, then resume checkpoint, at step t."""
    g, r, batch = self.g, self.r, self.batch
    self.store.wait()  # the previous event's checkpoint is sealed (and its callback run) first
    if t in self.evals:
      rows = []
      out = started["eval"]()
      if t > 0 and self.acc["count"] > 0:
        acc = self._merged_acc()
        out["train"] = {"loss": acc["loss"] / acc["count"],
                        "grad_norm": acc["grad_norm"] / acc["count"]}
        self.acc = group_lib.empty_accumulator(self.rp)
      per_run = [{} for _ in g.runs]
      for ev in sorted(out):
        for m in sorted(out[ev]):
          vals = np.asarray(out[ev][m])
          for i, run in enumerate(g.runs):
            v = float(vals[i])
            rows.append((t * batch, run, ev, m, v))
            per_run[i][f"{ev}/{m}"] = v
      self.metrics.append(rows)
      self.hooks.emit("on_evaluation", TrainingEvent(
          "evaluation", g.index, t * batch, tuple(g.runs),
          metrics=dict(zip(g.runs, per_run))))
      for run, values in zip(g.runs, per_run):
        self.tb.scalars(run, values, t * batch)
      ev, metric = self.headline
      if metric in out.get(ev, {}):
        self.last_loss = float(np.mean(np.asarray(out[ev][metric])[:r]))
    state = started["state"]() if "state" in started else None
    if t in self.ckpts and t > 0:
      params = state.params if state is not None else started["params"]()
      self.store.save_params(t * batch, jax.tree.map(lambda x: x[:r], params))
    if state is not None:
      self._save_resume(t, state)

  def _save_resume(self, t: int, state=None) -> None:
    """Starts saving the resume checkpoint of step t (`state`: the train state at t on
    the host; None: the current state, which no chunk has been sent past)."""
    self.tb.flush()  # TensorBoard events up to t reach the disk before the state that skips them
    r = self.r
    if state is None:
      state = distributed.to_host(self.state)
    state = jax.tree.map(lambda x: x[:r], state)
    acc = self._merged_acc()
    acc = {"loss": acc["loss"][:r], "grad_norm": acc["grad_norm"][:r], "count": acc["count"]}
    self.store.save_state(t * self.batch, group_lib.resume_tree(state, acc, t))
    self.saved_at = t

  def _merged_acc(self) -> dict:
    """The training-loss sums of every run (each summed by the process stepping it)."""
    return {"loss": distributed.merge_runs(self.acc["loss"], self.owner),
            "grad_norm": distributed.merge_runs(self.acc["grad_norm"], self.owner),
            "count": self.acc["count"]}
