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

from icldyn import step as train_lib
from icldyn.analysis import measures as measures_lib
from icldyn.patching import core
from icldyn.tasks import corrupt as corrupt_lib

DIRECTIONS = ("noising", "denoising")


@dataclasses.dataclass(frozen=True)
class Data:
  """A group's fixed patching data, every leaf with a leading run axis [R, ...].

  Attributes:
    clean, corrupted: the task's batches [R, B, ...].
    readout: the clean batches' read-out (`icldyn.tasks.corrupt.Readout`, [R, B, Rows]).
    num_outputs: [R] output counts.
  """
  clean: Any
  corrupted: Any
  readout: corrupt_lib.Readout
  num_outputs: Any


def make_data(static: train_lib.Static, table, props: train_lib.Props, corruption: str | None,
              size: int) -> Data:
  """Each run's clean batch (the first `size` sequences of its analysis
  evaluation set, as `icldyn analyze` reads) and its corruption.

  Raises:
    ConfigError: the task has no such corruption.
  """
  fn = corrupt_lib.get(static.task.name, corruption)
  clean = measures_lib.eval_batch(static, table, props, size)
  corrupted, readout = jax.device_get(jax.jit(jax.vmap(fn))(clean))
  return Data(clean=clean, corrupted=corrupted, readout=readout,
              num_outputs=np.asarray(props.data.num_outputs))


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
                 chunk: int | None = None) -> Callable:
  """`fn(params [K, R, ...], data) -> core.path_patch output with leading [K, R]`, jitted.

  Args:
    static: the group's static spec (its model).
    edges: the edges to patch.
    direction: 'noising' (base clean, source corrupted: Wang et al.) or
      'denoising'.
    chunk: runs per vmap (None: `default_chunk`).
  """
  spec = static.model
  chunk = default_chunk() if chunk is None else chunk

  def one(params, clean, corrupted, readout, num_outputs):
    base, source = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    return core.path_patch(spec, params, base, source, num_outputs, readout, edges)

  runs = _over_runs(one, chunk)

  def fn(params, data: Data):
    return jax.lax.map(lambda p: runs(p, data.clean, data.corrupted, data.readout,
                                      data.num_outputs), params)

  return jax.jit(fn)


def circuit_program(static: train_lib.Static, ablation: str = "mean", num_samples: int = 8,
                    metric: str = "logit_diff", seed: int = 0, chunk: int | None = None
                    ) -> Callable:
  """`fn(params [K, R, ...], data, circuits [R, L, H]) -> core.circuit_scores with [K, R]`, jitted.

  Mean ablation takes each head's mean over the run's clean batch at the
  same checkpoint (the reference distribution); the sampled subsets are the
  same at every checkpoint (key `seed`), so the curves are comparable.
  """
  spec = static.model
  chunk = default_chunk() if chunk is None else chunk
  key = jax.random.PRNGKey(seed)

  def one(params, clean, readout, num_outputs, circuit):
    means = core.head_means(spec, params, clean, num_outputs) if ablation == "mean" else None
    return core.circuit_scores(spec, params, clean, num_outputs, readout, circuit, means, key,
                               num_samples, metric)

  runs = _over_runs(one, chunk)

  def fn(params, data: Data, circuits):
    return jax.lax.map(lambda p: runs(p, data.clean, data.readout, data.num_outputs,
                                      circuits), params)

  return jax.jit(fn)


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


jax.tree_util.register_dataclass(Data, data_fields=["clean", "corrupted", "readout", "num_outputs"],
                                 meta_fields=[])
