"""A compile group on its devices: placing, compiling, its event schedule, its resume state.

Training (`icldyn.runner`), the dense re-run (`icldyn.analysis.densify`) and
the benchmarks place and compile a group the same way, so a re-run is
bitwise the original run; this module is that one way:

- `Placed`: the group's runs padded to the device count and sharded over a
  mesh of its devices, the shared arrays replicated, and the programs of
  `icldyn.step.make_programs` compiled with icldyn's XLA options;
- `schedule(cfg, batch)`: the optimizer steps of every evaluation, stream
  checkpoint and resume checkpoint;
- `resume_tree`: what a resume checkpoint holds;
- `Progress`: the progress line on stderr.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import jax
import numpy as np

from icldyn import build
from icldyn import config as config_lib
from icldyn import sharding as sharding_lib
from icldyn import step as train_lib
from icldyn import xla_options
from icldyn.store import checkpoints as ckpt_lib


def compile_program(fn, *args, opt_level: int | None = None):
  """AOT-compiles a jitted function with icldyn's XLA options (optionally at a
  lower XLA optimisation level, for programs that run once)."""
  options = dict(xla_options.compiler_options(jax.default_backend()))
  if opt_level is not None:
    options["xla_backend_optimization_level"] = opt_level
  return fn.lower(*args).compile(compiler_options=options)


class Placed:
  """A prepared group placed on its devices, with its programs.

  Attributes:
    prepared: the `build.PreparedGroup`.
    runs: the group's run count R.
    mesh: the run mesh (at most R devices).
    padded: R padded to a multiple of the device count.
    props: per-run props, padded and sharded over the mesh.
    table: the task's shared arrays, replicated.
    init, chunk, evaluate: the jitted programs (`step.make_programs`).
  """

  def __init__(self, prepared: build.PreparedGroup):
    self.prepared = prepared
    self.runs = len(prepared.group.runs)
    self.mesh = sharding_lib.run_mesh(self.runs)
    self.padded = sharding_lib.padded_count(self.runs, self.mesh)
    self.props = sharding_lib.shard_runs(
        sharding_lib.pad_runs(prepared.props, self.runs, self.padded), self.mesh)
    self.table = sharding_lib.replicate(prepared.table, self.mesh)
    self.init, self.chunk, self.evaluate = train_lib.make_programs(prepared.static, self.mesh)

  @property
  def static(self) -> train_lib.Static:
    return self.prepared.static

  def initial_state(self):
    """Every run's initial train state (the init program runs once: compiled fast)."""
    return compile_program(self.init, self.props, opt_level=0)(self.props)

  def compile_training(self, state) -> tuple[Any, Any]:
    """(chunk, evaluate) compiled for states shaped like `state`."""
    chunk = compile_program(self.chunk, state, self.props, self.table, 0, 1)
    evaluate = compile_program(self.evaluate, state, self.props, self.table)
    return chunk, evaluate

  def shard(self, tree):
    """A restored host state, placed on the mesh like the training state."""
    return sharding_lib.shard_runs(tree, self.mesh)


# --------------------------------------------------------------------------
# The event schedule.


def eval_steps(total: int, batch: int, every: int) -> list[int]:
  """Steps after which to evaluate: 0, the first step past each multiple of
  `every` sequences, and the last step."""
  steps = {0, total}
  for t in range(1, total + 1):
    if (t * batch) // every > ((t - 1) * batch) // every:
      steps.add(t)
  return sorted(steps)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A group's events, in optimizer steps.

  Attributes:
    total: the last step.
    evals: steps with an evaluation (0 and the last included).
    ckpts: steps with a stream checkpoint.
    resumes: steps with a resume checkpoint (the last included).
  """
  total: int
  evals: tuple[int, ...]
  ckpts: tuple[int, ...]
  resumes: tuple[int, ...]

  @property
  def events(self) -> list[int]:
    """Every step with an event, ascending."""
    return sorted(set(self.evals) | set(self.ckpts) | set(self.resumes))


def schedule(cfg, batch: int) -> Schedule:
  """The events of training a group with config `cfg` at `batch` sequences per step."""
  total = -(-cfg.train.num_sequences // batch)
  evals = eval_steps(total, batch, cfg.train.eval_every)
  ckpts = ckpt_lib.schedule(cfg.train.num_sequences, cfg.checkpoint.every,
                            config_lib.checkpoint_sequences(cfg), cfg.checkpoint.log_num, batch)
  resumes = ([] if cfg.checkpoint.resume_every <= 0 else
             ckpt_lib.schedule(cfg.train.num_sequences, cfg.checkpoint.resume_every, [], 0, batch))
  return Schedule(total=total, evals=tuple(evals), ckpts=tuple(ckpts),
                  resumes=tuple(sorted(set(resumes) | {total})))


# --------------------------------------------------------------------------
# Resume states and the running means of the `train` evaluator.


def empty_accumulator(padded: int) -> dict:
  """Running sums of the training loss and gradient norm since the last evaluation."""
  return {"loss": np.zeros(padded), "grad_norm": np.zeros(padded), "count": 0}


def resume_tree(state, acc: dict, t: int) -> dict:
  """A resume state: the train state, the training-loss accumulators, the step."""
  return {"state": jax.device_get(state), "acc_loss": np.asarray(acc["loss"]),
          "acc_grad_norm": np.asarray(acc["grad_norm"]),
          "acc_count": np.int64(acc["count"]), "t": np.int64(t)}


def accumulator_of(restored: dict) -> dict:
  """The accumulators of a restored resume tree."""
  return {"loss": np.asarray(restored["acc_loss"]),
          "grad_norm": np.asarray(restored["acc_grad_norm"]),
          "count": int(restored["acc_count"])}


# --------------------------------------------------------------------------
# Progress output.


class Progress:
  """A progress line on stderr at most every `interval` seconds.

  Args:
    total_seqs: sequences at the end.
    quiet: print nothing.
    interval: seconds between lines.
    label: text after `[icldyn]` (the group, or what is running).
    headline: the name of the value shown after the rate (the task's
      headline metric, e.g. `fsl_train loss`).
  """

  def __init__(self, total_seqs: int, quiet: bool, interval: float = 5.0, label: str = "",
               headline: str = "loss"):
    self.total, self.quiet, self.interval, self.label = total_seqs, quiet, interval, label
    self.headline = headline
    self.t0 = time.time()
    self.last = 0.0
    self.start_seqs = None

  def update(self, seqs: int, loss: float | None, force: bool = False) -> None:
    if self.quiet:
      return
    now = time.time()
    if self.start_seqs is None:
      self.start_seqs, self.t0 = seqs, now
      return
    if not force and now - self.last < self.interval:
      return
    self.last = now
    rate = (seqs - self.start_seqs) / max(now - self.t0, 1e-9)
    eta = max(self.total - seqs, 0) / rate if rate > 0 else float("inf")
    loss_s = f"  {self.headline} {loss:.4f}" if loss is not None else ""
    eta_s = f"{eta:6.0f}s" if math.isfinite(eta) else "     ?"
    print(f"[icldyn]{self.label} {seqs:>10d}/{self.total} seqs  {rate:8.0f} seq/s/run  "
          f"ETA {eta_s}{loss_s}", file=sys.stderr, flush=True)


def headline(cfg) -> tuple[str, str]:
  """(evaluator, metric) of a config's task headline (progress line, default curve)."""
  ev, _, metric = config_lib.task_of(cfg).headline.partition("/")
  return ev, metric
