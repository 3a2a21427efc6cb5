"""Device mesh and run-axis sharding; padding of the run count.

The run axis is split over every device with `jax.sharding.NamedSharding`
(no pmap); shared arrays (the class table) are replicated. The training chunk
runs under `jax.shard_map` over the same mesh (`step.make_programs`), so each
device steps its own runs with nothing crossing devices. A grid whose run
count is not a multiple of the device count is padded with copies of its
last run, whose results are dropped.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

RUN_AXIS = "runs"


CPU_DEVICES_ENV = "ICLDYN_CPU_DEVICES"
_FORCE_FLAG = "--xla_force_host_platform_device_count"


def configure_cpu_devices(environ=os.environ) -> int | None:
  """Splits the host CPU into one XLA device per core (before JAX starts).

  XLA CPU runs many of a grid step's small fused loops on one thread; with one
  device per core, each core runs its share of the runs in parallel
  (docs/performance.md: 1.2-1.4x on 2 cores). `ICLDYN_CPU_DEVICES=N` sets the
  count (1 turns it off); an explicit `--xla_force_host_platform_device_count`
  in XLA_FLAGS wins. Only the host platform is affected: on a GPU machine the
  runs still go to the GPUs. Called by `icldyn train`, not on import.

  Returns:
    The device count set, or None if left alone.
  """
  flags = environ.get("XLA_FLAGS", "")
  if _FORCE_FLAG in flags:
    return None
  value = environ.get(CPU_DEVICES_ENV, "")
  try:
    n = int(value) if value else (os.cpu_count() or 1)
  except ValueError:
    raise ValueError(f"{CPU_DEVICES_ENV} must be a positive integer, got {value!r}") from None
  if n < 1:
    raise ValueError(f"{CPU_DEVICES_ENV} must be a positive integer, got {value!r}")
  environ["XLA_FLAGS"] = f"{flags} {_FORCE_FLAG}={n}".strip()
  return n


def run_mesh(num_runs: int | None = None) -> Mesh:
  """A 1-D mesh, axis name 'runs', over all devices (or the first `num_runs`).

  A grid smaller than the device count uses that many devices instead of
  padding every device with copies of its last run. With several processes
  (`icldyn.distributed`) the devices are the global ones, in process order;
  if the first `num_runs` would leave a process without a device, every
  device is used (and the runs padded), since each process must take part
  in the grid's programs.
  """
  devices = jax.devices()
  if num_runs is not None:
    first = devices[:max(1, min(num_runs, len(devices)))]
    if len({d.process_index for d in first}) == jax.process_count():
      devices = first
  return Mesh(np.asarray(devices), (RUN_AXIS,))


def padded_count(num_runs: int, mesh: Mesh) -> int:
  """The smallest multiple of the device count that is >= num_runs."""
  n = mesh.devices.size
  return -(-num_runs // n) * n


def pad_runs(tree, num_runs: int, padded: int):
  """Pads every leaf's leading axis from num_runs to padded (repeating the last run)."""
  if padded == num_runs:
    return tree
  idx = np.concatenate([np.arange(num_runs), np.full(padded - num_runs, num_runs - 1)])
  return jax.tree.map(lambda x: np.asarray(x)[idx], tree)


def _place(tree, sharding: NamedSharding):
  """`jax.device_put`, or with several processes each process's shards from its host copy.

  Every process holds the same host values (built from the same config), so
  each places its own shards; `jax.device_put` would first all-gather every
  leaf to check that the processes agree.
  """
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def place(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(place, tree)


def shard_runs(tree, mesh: Mesh):
  """Places every leaf with its leading (run) axis split over the mesh."""
  return _place(tree, NamedSharding(mesh, P(RUN_AXIS)))


def replicate(tree, mesh: Mesh):
  """Places every leaf on every device."""
  return _place(tree, NamedSharding(mesh, P()))
