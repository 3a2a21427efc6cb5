"""Checkpoints: the analysis stream (params only) and resume states, via orbax.

Layout (docs/interfaces.md): `DIR/checkpoints/g{group}/stream/{step}` holds
the parameters of every run of a group stacked on a leading run axis, on the
schedule of `checkpoint.every`, `checkpoint.steps` and `checkpoint.log_num`;
`DIR/checkpoints/g{group}/resume/{step}` holds the full train state (the two
newest are kept). `step` is training sequences seen. Orbax writes each step
to a temporary directory and renames it when complete, so a half-written
checkpoint is never listed.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp


def schedule(num_sequences: int, every: int, explicit: list[int], log_num: int,
             batch_size: int) -> list[int]:
  """Checkpoint steps (in optimizer steps) from a sequence-count schedule.

  A requested sequence count s maps to the first step t with t * batch >= s.
  The union of: every `every` sequences, the explicit list, `log_num`
  log-spaced points between one batch and the end, and the final step.
  """
  total = -(-num_sequences // batch_size)
  seqs = set(explicit)
  if every > 0:
    seqs.update(range(every, num_sequences + 1, every))
  if log_num > 0:
    seqs.update(np.unique(np.round(np.geomspace(batch_size, num_sequences, log_num))).astype(int))
  steps = {min(total, -(-s // batch_size)) for s in seqs if s <= num_sequences}
  steps.add(total)
  return sorted(steps)


class Store:
  """The checkpoints of one group: a params stream and resume states."""

  def __init__(self, workdir: str, group: int, read_only: bool = False):
    base = os.path.join(os.path.abspath(workdir), "checkpoints", f"g{group}")
    opts = dict(enable_async_checkpointing=False, create=not read_only, read_only=read_only,
                cleanup_tmp_directories=not read_only)
    self.stream = ocp.CheckpointManager(
        os.path.join(base, "stream"), options=ocp.CheckpointManagerOptions(**opts))
    self.resume = ocp.CheckpointManager(
        os.path.join(base, "resume"),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, **opts))

  def save_params(self, step: int, params: Any) -> None:
    """Saves stacked params [R, ...] at `step` sequences (numpy on host)."""
    if step in self.stream.all_steps():
      return
    self.stream.save(step, args=ocp.args.StandardSave(jax.device_get(params)))
    self.stream.wait_until_finished()

  def save_state(self, step: int, state: Any) -> None:
    """Saves a resume state at `step` sequences."""
    if step in self.resume.all_steps():
      return
    self.resume.save(step, args=ocp.args.StandardSave(jax.device_get(state)))
    self.resume.wait_until_finished()

  def resume_steps(self) -> list[int]:
    self.resume.reload()
    return sorted(self.resume.all_steps())

  def restore_state(self, step: int, like: Any) -> Any:
    """Restores a resume state shaped like `like` (numpy leaves)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)
    return self.resume.restore(step, args=ocp.args.StandardRestore(abstract))

  def stream_steps(self) -> list[int]:
    self.stream.reload()
    return sorted(self.stream.all_steps())

  def restore_params(self, step: int) -> Any:
    """Restores the stacked params saved at `step`."""
    return self.stream.restore(step, args=ocp.args.StandardRestore())

  def close(self) -> None:
    self.stream.close()
    self.resume.close()


def stream(workdir: str, group: int = 0) -> Iterator[tuple[int, Any]]:
  """Iterates `(step, stacked params)` over a group's checkpoint stream, lazily."""
  store = Store(workdir, group, read_only=True)
  try:
    for step in store.stream_steps():
      yield step, store.restore_params(step)
  finally:
    store.close()


def restore_run(workdir: str, step: int, group: int = 0, index: int = 0) -> Any:
  """The params of run `index` of a group at `step` sequences."""
  store = Store(workdir, group, read_only=True)
  try:
    params = store.restore_params(step)
  finally:
    store.close()
  return jax.tree.map(lambda x: np.asarray(x)[index], params)
