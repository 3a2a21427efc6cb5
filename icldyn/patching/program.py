"""The whole-group patching programs: every run of a group, several checkpoints per call.

One jitted program per group and question: `lax.map` over a block of
checkpoints (`[K, R, ...]` stacked params), and inside it the runs
(`lax.map` in chunks of `chunk` runs, each chunk one `vmap`), and inside
that one run's interventions (`icldyn.patching.core`, themselves vmapped
over heads and edges). The same compiled program serves every block of the
stream; the last block is padded by repeating its last checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from icldyn import sharding
from icldyn import step as train_lib
from icldyn import xla_options
from icldyn.analysis import measures as measures_lib
from icldyn.patching import core
from icldyn.tasks import corrupt as corrupt_lib

DIRECTIONS = ("noising", "denoising")
EDGE_SETS = 16  # edge sets per vmap in the edge-level scores unless told


@dataclasses.dataclass(frozen=True)
class Data:
  """A group's fixed patching data, every leaf with a leading run axis [R, ...].

  Attributes:
    clean, corrupted: the task's batches [R, B, ...].
    readout: the clean batches' read-out (`icldyn.tasks.corrupt.Readout`, [R, B, Rows]).
    num_outputs: [R] output counts.
    clamp: the runs' training clamp arrays (`Props.clamp`, [R, ...]), or None.
  """
  clean: Any
  corrupted: Any
  readout: corrupt_lib.Readout
  num_outputs: Any
  clamp: Any = None


def make_data(static: train_lib.Static, table, props: train_lib.Props, corruption: str | None,
              size: int) -> Data:
  """Each run's clean batch (the first `size` sequences of its analysis
  evaluation set, as `icldyn analyze` reads), its corruption and its training clamps.

  Raises:
    ConfigError: the task has no such corruption.
  """
  fn = corrupt_lib.get(static.task.name, corruption)
  clean = measures_lib.eval_batch(static, table, props, size)
  corrupted, readout = jax.device_get(jax.jit(jax.vmap(fn))(clean))
  return Data(clean=clean, corrupted=corrupted, readout=readout,
              num_outputs=np.asarray(props.data.num_outputs), clamp=props.clamp)


def plan_of(static: train_lib.Static, clamped: bool):
  """The clamp plan the patching passes run under: the training one (`clamped`) or None."""
  return static.plan if clamped else None


def _over_runs(one: Callable, chunk: int) -> Callable:
  def fn(*args):
    if not chunk:
      return jax.vmap(one)(*args)
    return jax.lax.map(lambda a: one(*a), args, batch_size=chunk)
  return fn


def default_chunk() -> int:
  """Runs per vmap: 8 on a CPU (tiny batched matmuls are slow there), else all."""
  return 8 if jax.default_backend() == "cpu" else 0


def path_program(static: train_lib.Static, edges: core.Edges, direction: str = "noising",
                 chunk: int | None = None, clamped: bool = True,
                 batch_size: int | None = None) -> Callable:
  """`fn(params [K, R, ...], data) -> core.path_patch output with leading [K, R]`, jitted.

  Args:
    static: the group's static spec (its model and training clamp plan).
    edges: the edges to patch.
    direction: 'noising' (base clean, source corrupted: Wang et al.) or
      'denoising'.
    chunk: runs per vmap (None: `default_chunk`).
    clamped: run every pass under the runs' training clamps (False: the
      unclamped model with the same parameters).
    batch_size: senders per vmap inside a run (`core.path_patch`; None: all).
  """
  spec = static.model
  chunk = default_chunk() if chunk is None else chunk
  plan = plan_of(static, clamped)

  def one(params, clean, corrupted, readout, num_outputs, clamp):
    base, source = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    return core.path_patch(spec, params, base, source, num_outputs, readout, edges, plan=plan,
                           clamp_params=clamp, batch_size=batch_size)

  runs = _over_runs(one, chunk)

  def fn(params, data: Data):
    return jax.lax.map(lambda p: runs(p, data.clean, data.corrupted, data.readout,
                                      data.num_outputs, data.clamp), params)

  return GroupProgram(fn)


def circuit_program(static: train_lib.Static, ablation: str = "mean", num_samples: int = 8,
                    metric: str = "logit_diff", seed: int = 0, chunk: int | None = None,
                    clamped: bool = True, batch_size: int | None = None) -> Callable:
  """Head-level scores: `fn(params [K, R, ...], data, circuits [R, L, H]) ->
  core.circuit_scores with [K, R]`, jitted.

  Mean ablation takes each head's mean over the run's clean batch at the
  same checkpoint (the reference distribution); the sampled subsets are the
  same at every checkpoint (key `seed`), so the curves are comparable.
  `clamped`, `batch_size` (knocked-out sets per vmap): as `path_program`.
  """
  spec = static.model
  chunk = default_chunk() if chunk is None else chunk
  key = jax.random.PRNGKey(seed)
  plan = plan_of(static, clamped)

  def one(params, clean, readout, num_outputs, clamp, circuit):
    means = (core.head_means(spec, params, clean, num_outputs, plan=plan, clamp_params=clamp)
             if ablation == "mean" else None)
    return core.circuit_scores(spec, params, clean, num_outputs, readout, circuit, means, key,
                               num_samples, metric, plan=plan, clamp_params=clamp,
                               batch_size=batch_size)

  runs = _over_runs(one, chunk)

  def fn(params, data: Data, circuits):
    return jax.lax.map(lambda p: runs(p, data.clean, data.readout, data.num_outputs,
                                      data.clamp, circuits), params)

  return GroupProgram(fn)


def edge_circuit_program(static: train_lib.Static, ablation: str = "mean", num_samples: int = 8,
                         metric: str = "logit_diff", seed: int = 0, chunk: int | None = None,
                         clamped: bool = True, batch_size: int | None = None) -> Callable:
  """Edge-level scores: `fn(params [K, R, ...], data, circuits [R, E], index [R, P]) ->
  core.edge_scores with [K, R]`, jitted.

  `circuits`: each run's circuit as a flat edge mask (`core.flat_edges`);
  `index`: the flat indices of its edges scored for minimality, padded with
  -1 to the largest circuit. Means, subsets, `clamped` and `batch_size`
  (edge sets per vmap): as `circuit_program`.
  """
  spec = static.model
  chunk = default_chunk() if chunk is None else chunk
  key = jax.random.PRNGKey(seed)
  plan = plan_of(static, clamped)
  # Each edge set holds every head's ablated input streams ([3, H, B, T, d]):
  # hundreds of sets side by side ran out of memory (34 GB for 8 runs of the
  # paper model), so by default 16 at a time.
  batch_size = EDGE_SETS if batch_size is None else batch_size

  def one(params, clean, readout, num_outputs, clamp, circuit, index):
    means = (core.head_means(spec, params, clean, num_outputs, plan=plan, clamp_params=clamp)
             if ablation == "mean" else None)
    return core.edge_scores(spec, params, clean, num_outputs, readout, circuit, index, means, key,
                            num_samples, metric, plan=plan, clamp_params=clamp,
                            batch_size=batch_size)

  runs = _over_runs(one, chunk)

  def fn(params, data: Data, circuits, index):
    return jax.lax.map(lambda p: runs(p, data.clean, data.readout, data.num_outputs,
                                      data.clamp, circuits, index), params)

  return GroupProgram(fn)


class GroupProgram:
  """A whole-group program, jitted once per run count, its runs split over the devices.

  `fn(params [K, R, ...], data, *per_run [R, ...])` runs under `jax.shard_map`
  over the run mesh (`icldyn.sharding`: one XLA CPU device per core, as
  `icldyn` sets up), so each device computes its own runs: on a 2-core CPU
  both cores work (one device's program runs on one core). Runs are padded
  to a multiple of the device count by repeating the last, and the padding
  is dropped from the result. Compiled with the grid programs' XLA options
  (`icldyn.xla_options`: on CPU, YNNPACK for dots only, which took the path
  patching of the paper model from 389 to 244 ms per run and checkpoint).
  """

  def __init__(self, fn: Callable):
    self.fn = fn
    self._compiled: dict[int, tuple[Any, int]] = {}

  def _program(self, num_runs: int, num_args: int):
    key = (num_runs, num_args)
    if key not in self._compiled:
      mesh = sharding.run_mesh(num_runs)
      runs = sharding.RUN_AXIS
      mapped = jax.shard_map(self.fn, mesh=mesh,
                             in_specs=(P(None, runs),) + (P(runs),) * num_args,
                             out_specs=P(None, runs))
      self._compiled[key] = (jax.jit(mapped, compiler_options=xla_options.compiler_options(
          jax.default_backend())), sharding.padded_count(num_runs, mesh))
    return self._compiled[key]

  def __call__(self, params, data: Data, *per_run):
    """Results [K, R, ...] of `fn` on stacked params [K, R, ...] and per-run inputs [R, ...]."""
    num_runs = int(np.shape(data.num_outputs)[0])
    program, padded = self._program(num_runs, 1 + len(per_run))
    if padded != num_runs:
      params = jax.tree.map(lambda x: np.swapaxes(
          sharding.pad_runs(np.swapaxes(np.asarray(x), 0, 1), num_runs, padded), 0, 1), params)
      data, per_run = sharding.pad_runs((data, per_run), num_runs, padded)
    out = program(params, data, *per_run)
    return jax.tree.map(lambda x: x[:, :num_runs], out) if padded != num_runs else out


def stack_block(items: list[Any], size: int) -> Any:
  """Params of up to `size` checkpoints stacked on a new leading axis, padded by repeating the last."""
  items = list(items) + [items[-1]] * (size - len(items))
  return jax.tree.map(lambda *xs: np.stack(xs), *items)


def blocks(stream, size: int):
  """Yields (steps, stacked params [size, R, ...]) from a `(step, params)` stream."""
  steps, items = [], []
  for step, params in stream:
    steps.append(step)
    items.append(params)
    if len(items) == size:
      yield steps, stack_block(items, size)
      steps, items = [], []
  if items:
    yield steps, stack_block(items, size)


def as_numpy(tree) -> Any:
  return jax.tree.map(np.asarray, jax.device_get(tree))


def put(data: Data) -> Data:
  return jax.tree.map(jnp.asarray, data)


jax.tree_util.register_dataclass(Data, data_fields=["clean", "corrupted", "readout", "num_outputs",
                                                "clamp"], meta_fields=[])
