"""Device mesh and run-axis sharding; padding of the run count.

The run axis is split over every device with `jax.sharding.NamedSharding`
(no pmap); shared arrays (the class table) are replicated. A grid whose run
count is not a multiple of the device count is padded with copies of its
last run, whose results are dropped.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

RUN_AXIS = "runs"


def maybe_initialize_distributed() -> None:
  """Initialises multi-host JAX when the launcher set the coordinator address.

  Set `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`
  (or run under a cluster JAX auto-detects) to span hosts with one command.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS") and jax.process_count() == 1:
    jax.distributed.initialize()


def run_mesh() -> Mesh:
  """A 1-D mesh over all devices, axis name 'runs'."""
  return Mesh(np.asarray(jax.devices()), (RUN_AXIS,))


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


def shard_runs(tree, mesh: Mesh):
  """Places every leaf with its leading (run) axis split over the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P(RUN_AXIS)))


def replicate(tree, mesh: Mesh):
  """Places every leaf on every device."""
  return jax.device_put(tree, NamedSharding(mesh, P()))
