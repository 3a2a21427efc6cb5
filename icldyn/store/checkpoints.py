"""Checkpoints: the analysis stream (params only) and resume states, via orbax.

Layout (docs/interfaces.md): `DIR/checkpoints/g{group}/stream/{step}` holds
the parameters of every run of a group stacked on a leading run axis, on the
schedule of `checkpoint.every`, `checkpoint.steps` and `checkpoint.log_num`;
`DIR/checkpoints/g{group}/resume/{step}` holds the full train state (the two
newest are kept). `step` is training sequences seen. Each step directory
also holds `icldyn_manifest.json`.

Crash safety. Orbax writes each step to a temporary directory and renames it
when complete, so a half-written checkpoint is never listed; temporary
directories a killed process left are removed when a writing `Store` opens.
Then icldyn seals the step with `icldyn_manifest.json` (size and SHA-256 of
every file), written atomically. A checkpoint is only read after its files
are checked against the manifest, so a damaged one (a truncated, missing or
altered file) raises `CheckpointDamaged` naming its step, path and file, before
orbax reads a byte; `Store.restore_latest_state` moves such resume states to
`damaged/` and falls back to the newest intact one. A step without a manifest
(killed between orbax's rename, which makes it complete, and the seal; or
written by an older icldyn or another tool) is read unchecked, and a resume
state then sealed; if it cannot be read it counts as damaged. Old checkpoints
are removed by renaming them into `trash/` first, so a removal cut short never
leaves a half-deleted step that looks finished.

Saves are asynchronous (orbax's async checkpointing): `save_params` and
`save_state` copy the tree on the host, start orbax's write in its background
thread and return, so training goes on while the files are written. At most
one save is in flight: the next save, `wait`, `close` and every read first
wait for it to finish and then seal it (in the caller's thread), so steps are
sealed in the order they were saved, a resume state's save starts only after
every earlier stream checkpoint is sealed, and old resume states are removed
only after the new one is sealed. A crash while a save is in flight leaves
its temporary directory (removed at the next start) or an unsealed complete
step; either way the workdir resumes from the newest complete resume state
and drops the stream checkpoints after it, as after a crash in a synchronous
save (tests/test_checkpoints.py, tests/test_reliability.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from icldyn import faults
from icldyn.store import files as wd_lib

MANIFEST = "icldyn_manifest.json"


class CheckpointDamaged(Exception):
  """A checkpoint that cannot be read back intact."""

  def __init__(self, kind: str, step: int, path: str, reason: str):
    super().__init__(f"the {kind} checkpoint at step {step} ({path}) is damaged: {reason}")
    self.kind, self.step, self.path, self.reason = kind, step, path, reason


class CheckpointNotFound(LookupError):
  """No checkpoint at the step asked for; the message names the nearest ones."""


class CheckpointMismatch(Exception):
  """An intact resume state that does not fit the train state being restored."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, no permission, ...)."""


def _reason(e: BaseException) -> str:
  """An orbax/tensorstore error in a few words: its OS error if it has one, else its first line."""
  x = e
  while x is not None:
    code = x.errno if isinstance(x, OSError) else None
    m = re.search(r"os_error_code='(\d+)'", str(x))
    code = code or (int(m.group(1)) if m else None)
    if code:
      return f"[Errno {code}] {os.strerror(code)}"
    x = x.__cause__ or x.__context__
  text = str(e).strip().split("\n")[0].split(" [tensorstore_spec")[0]
  return f"{type(e).__name__}: {text[:300]}"


def _ignore_closed_loop(hook):
  """Wraps sys.unraisablehook to drop one known-harmless orbax/tensorstore complaint.

  After a failed save or restore, tensorstore completes its remaining futures
  on the event loop orbax has already closed; each prints "RuntimeError: Event
  loop is closed" (nothing is lost: the operation has failed and is reported).
  """
  def filtered(unraisable):
    err = unraisable.exc_value
    if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
      return
    hook(unraisable)
  filtered.icldyn = True
  return filtered


if not getattr(sys.unraisablehook, "icldyn", False):
  sys.unraisablehook = _ignore_closed_loop(sys.unraisablehook)


class _OrbaxErrorsQuiet:
  """Orbax logs each failed write with a traceback; icldyn reports it once, in one line.

  A context manager, or `enter`/`exit` held across calls: an asynchronous
  save's failure is logged by orbax's background thread, between the save
  and the wait.
  """

  def __init__(self):
    self.level = None

  def enter(self) -> None:
    if self.level is None:
      logger = logging.getLogger("absl")
      self.level = logger.level
      logger.setLevel(logging.CRITICAL)

  def exit(self) -> None:
    if self.level is not None:
      logging.getLogger("absl").setLevel(self.level)
      self.level = None

  def __enter__(self) -> None:
    self.enter()

  def __exit__(self, *exc) -> None:
    self.exit()


class _ReadOnlyNotes(logging.Filter):
  """Drops orbax's warnings that a read-only manager is read-only (one per
  restore otherwise: analysis opens a manager per group and checkpoint)."""

  NOTES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.NOTES)


@contextlib.contextmanager
def _read_only_notes_quiet():
  logger, note = logging.getLogger("absl"), _ReadOnlyNotes()
  logger.addFilter(note)
  try:
    yield
  finally:
    logger.removeFilter(note)


def _path_name(path) -> str:
  """A pytree key path as 'a/b/0', the same for a NamedTuple and the dict orbax restores."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _leaves_by_path(tree) -> dict[str, np.ndarray]:
  return {_path_name(p): np.asarray(leaf)
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
  return sorted(f for f in out if f != MANIFEST and wd_lib.TMP_MARK not in f)


def seal(step_dir: str) -> None:
  """Writes the manifest of a finished checkpoint directory (atomically)."""
  files = {f: [os.path.getsize(os.path.join(step_dir, f)), _sha256(os.path.join(step_dir, f))]
           for f in _files(step_dir)}
  wd_lib.write_json(os.path.join(step_dir, MANIFEST), {"files": files})


def check(step_dir: str) -> str | None:
  """Why a checkpoint directory is not intact (None if it matches its manifest).

  Raises:
    FileNotFoundError: it has no manifest.
  """
  with open(os.path.join(step_dir, MANIFEST)) as f:
    try:
      files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError) as e:
      return f"unreadable {MANIFEST} ({e})"
  for name, (size, sha) in sorted(files.items()):
    p = os.path.join(step_dir, name)
    if not os.path.isfile(p):
      return f"{name} is missing"
    if os.path.getsize(p) != size:
      return f"{name} has {os.path.getsize(p)} bytes, its manifest says {size}"
    if _sha256(p) != sha:
      return f"{name} does not match its SHA-256"
  return None


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


def _faulty_tmp_path_class():
  """An orbax temporary path that passes the `in_checkpoint` fault hook before its rename."""
  from orbax.checkpoint._src.path import atomicity  # only under ICLDYN_FAULT

  class FaultyTemporaryPath(atomicity.AtomicRenameTemporaryPath):
    async def finalize(self, *args, **kwargs):
      if self.get_final().name.isdigit():  # the step directory (not an item inside it)
        faults.hit("in_checkpoint")
      return await super().finalize(*args, **kwargs)

  return FaultyTemporaryPath


class Store:
  """The checkpoints of one group: a params stream and resume states.

  Args:
    workdir: the workdir.
    group: the compile group.
    read_only: open for reading only (analysis).
    on_sealed: called as `on_sealed(kind, step, path)` after each checkpoint
      this store saved is sealed (its files complete and its manifest written).
  """

  KEEP_RESUME = 2

  def __init__(self, workdir: str, group: int, read_only: bool = False,
               on_sealed: Callable[[str, int, str], None] | None = None):
    self.base = os.path.join(os.path.abspath(workdir), wd_lib.CHECKPOINTS_DIR, f"g{group}")
    self.read_only = read_only
    self.on_sealed = on_sealed
    self._pending: tuple[str, int] | None = None  # the save in flight: (kind, step)
    self._quiet = _OrbaxErrorsQuiet()
    # Asynchronous saves: orbax writes in a background thread while training
    # goes on; `_settle` waits for it and seals.
    opts = dict(enable_async_checkpointing=not read_only, create=not read_only,
                read_only=read_only, cleanup_tmp_directories=not read_only)
    if jax.process_count() > 1:
      # Several processes train one grid, and only this one reads or writes the
      # checkpoints (icldyn.distributed: process 0 writes the workdir from
      # gathered values), so orbax must not wait for the others at its barriers.
      me = jax.process_index()
      opts["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
          primary_host=me, active_processes={me})
      if not read_only:  # orbax cannot create directories for a subset of processes
        for kind in ("stream", "resume"):
          os.makedirs(os.path.join(self.base, kind), exist_ok=True)
        opts["create"] = False
    if not read_only:
      self._empty_trash()
      if faults.active("in_checkpoint"):
        opts["temporary_path_class"] = _faulty_tmp_path_class()
    self._opts = opts
    self.stream = self._manager("stream")
    self.resume = self._manager("resume")

  def _manager(self, kind: str) -> ocp.CheckpointManager:
    with _read_only_notes_quiet():
      return ocp.CheckpointManager(os.path.join(self.base, kind),
                                   options=ocp.CheckpointManagerOptions(**self._opts))

  def _reopen(self, kind: str) -> None:
    """A fresh manager: a failed restore can leave orbax's guess of the item layout wrong,
    and a failed save its background state."""
    try:
      with _OrbaxErrorsQuiet():
        getattr(self, kind).close()
    except Exception:  # the failure being handled, raised again by orbax's close
      pass
    setattr(self, kind, self._manager(kind))

  # -- paths and housekeeping

  def path(self, kind: str, step: int) -> str:
    """The directory of a `kind` ('stream' or 'resume') checkpoint."""
    return os.path.join(self.base, kind, str(step))

  def _steps(self, kind: str) -> list[int]:
    """Step directories of `kind`, sealed or not (orbax lists only those it can parse)."""
    d = os.path.join(self.base, kind)
    names = os.listdir(d) if os.path.isdir(d) else []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(d, n)))

  def _empty_trash(self) -> None:
    shutil.rmtree(os.path.join(self.base, "trash"), ignore_errors=True)

  def _discard(self, kind: str, step: int, into: str = "trash") -> str:
    """Moves a step out of its manager's directory (atomically), then reloads the manager."""
    dest_dir = os.path.join(self.base, into)
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, f"{kind}_{step}")
    if os.path.exists(dest):
      shutil.rmtree(dest)
    os.replace(self.path(kind, step), dest)
    getattr(self, kind).reload()
    return dest

  def _verify(self, kind: str, step: int) -> bool:
    """Checks a step against its manifest: True if sealed and intact, False if unsealed.

    Raises:
      CheckpointNotFound: there is no checkpoint at `step`.
      CheckpointDamaged: a file differs from the manifest.
    """
    path = self.path(kind, step)
    if not os.path.isdir(path):
      steps = self._steps(kind)
      if not steps:
        raise CheckpointNotFound(f"there are no {kind} checkpoints in {os.path.dirname(path)}")
      near = sorted(sorted(steps, key=lambda s: (abs(s - step), s))[:3])
      raise CheckpointNotFound(
          f"there is no {kind} checkpoint at step {step}; the nearest are at "
          f"{', '.join(map(str, near))} (of {len(steps)}, {steps[0]} to {steps[-1]}, in "
          f"{os.path.dirname(path)})")
    try:
      why = check(path)
    except FileNotFoundError:
      return False  # written by an older icldyn or another tool, or killed before its seal
    if why:
      raise CheckpointDamaged(kind, step, path, why)
    return True

  # -- writing

  def _write_error(self, kind: str, step: int, e: BaseException) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"cannot write the {kind} checkpoint at step {step} ({self.path(kind, step)}): "
        f"{_reason(e)}")

  def _save(self, kind: str, step: int, tree: Any) -> None:
    """Starts saving `tree` (after sealing the save in flight, if any) and returns."""
    self._settle()
    manager = getattr(self, kind)
    if os.path.isdir(self.path(kind, step)):
      if os.path.exists(os.path.join(self.path(kind, step), MANIFEST)):
        return  # saved (and sealed) before
      self._discard(kind, step)  # unsealed: redo
    # A copy: the caller's arrays may change (or, on CPU, be views of device
    # buffers that a later chunk reuses) while orbax writes in the background.
    tree = jax.tree.map(lambda x: np.array(x) if isinstance(x, np.ndarray) else x,
                        jax.device_get(tree))
    self._quiet.enter()  # until `_settle`: a failure is logged from orbax's thread
    try:
      manager.save(step, args=ocp.args.StandardSave(tree))
    except Exception as e:  # ENOSPC, EACCES, ... surface as assorted orbax/tensorstore errors
      self._quiet.exit()
      self._reopen(kind)
      raise self._write_error(kind, step, e) from e
    self._pending = (kind, step)

  def _settle(self) -> None:
    """Waits for the save in flight (if any) to finish, then seals it.

    Raises:
      CheckpointWriteError: the background write failed (the step is left
        unsealed or absent: a later start redoes or ignores it).
    """
    if self._pending is None:
      return
    kind, step = self._pending
    self._pending = None
    try:
      try:
        getattr(self, kind).wait_until_finished()
        getattr(self, kind).check_for_errors()
      finally:
        self._quiet.exit()
      if not os.path.isdir(self.path(kind, step)):  # orbax logged the failure and went on
        raise OSError(f"orbax did not finish writing {self.path(kind, step)}")
      faults.hit("before_manifest")
      seal(self.path(kind, step))
    except Exception as e:
      self._reopen(kind)
      raise self._write_error(kind, step, e) from e
    faults.hit("after_checkpoint")
    if kind == "resume":  # the new state is sealed: the older ones may go
      for old in self._steps("resume")[:-self.KEEP_RESUME]:
        self._discard("resume", old)
      self._empty_trash()
    if self.on_sealed is not None:
      self.on_sealed(kind, step, self.path(kind, step))

  def wait(self) -> None:
    """Waits for the save in flight and seals it (`CheckpointWriteError` if it failed)."""
    self._settle()

  def save_params(self, step: int, params: Any) -> None:
    """Starts saving stacked params [R, ...] at `step` sequences (returns before
    the files are written; `wait` or the next save seals them)."""
    self._save("stream", step, params)

  def save_state(self, step: int, state: Any) -> None:
    """Starts saving a resume state at `step` sequences; once it is sealed, only
    the two newest are kept."""
    self._save("resume", step, state)

  def drop_stream_after(self, step: int) -> list[int]:
    """Removes stream checkpoints past `step` (a resume rewrites them); returns their steps."""
    self._settle()
    dropped = [s for s in self._steps("stream") if s > step]
    for s in dropped:
      self._discard("stream", s)
    self._empty_trash()
    return dropped

  # -- reading

  def resume_steps(self) -> list[int]:
    """Steps of the resume states (not yet checked)."""
    self._settle()
    return self._steps("resume")

  def restore_state(self, step: int, like: Any, trim_runs: bool = False) -> Any:
    """Checks and restores a resume state shaped like `like` (numpy leaves).

    With `trim_runs`, a leaf whose leading (run) axis is longer than `like`'s
    is cut to it: a state stored with padding runs at the end (icldyn
    before resume states were stored unpadded) restores on any device count.

    An unsealed state (orbax renamed it, so it is complete, but the process
    died before the seal) is restored and, in a writable store, sealed.

    Raises:
      CheckpointDamaged: a file differs from its manifest, or unsealed and unreadable.
      CheckpointMismatch: intact, but not shaped like `like` (another icldyn version).
    """
    self._settle()
    path = self.path("resume", step)
    sealed = self._verify("resume", step)
    try:
      with _OrbaxErrorsQuiet():
        self.resume.reload()
        raw = self.resume.restore(step, args=ocp.args.StandardRestore())
    except Exception as e:
      self._reopen("resume")
      if sealed:
        raise CheckpointMismatch(f"the resume checkpoint at step {step} ({path}) is intact but "
                                 f"this version of icldyn cannot read it: {_reason(e)}") from e
      raise CheckpointDamaged("resume", step, path, f"unreadable, and it has no {MANIFEST}: "
                              f"{_reason(e)}") from e
    # Orbax restores into a target without checking shapes, so match leaves by path here.
    got = _leaves_by_path(raw)
    want, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [_path_name(p) for p, _ in want]
    for name, (_, leaf) in zip(names, want):
      a, b = got.get(name), np.asarray(leaf)
      if (trim_runs and a is not None and a.ndim == b.ndim >= 1 and a.shape[1:] == b.shape[1:]
          and a.shape[0] > b.shape[0]):
        a = got[name] = a[:b.shape[0]]
      if a is None or a.shape != b.shape or a.dtype != b.dtype:
        found = "nothing" if a is None else f"{a.dtype}{list(a.shape)}"
        raise CheckpointMismatch(
            f"the resume checkpoint at step {step} ({path}) is intact but does not fit the train "
            f"state of this version of icldyn: {name} should be {b.dtype}{list(b.shape)}, "
            f"it holds {found}")
    extra = sorted(set(got) - set(names))
    if extra:
      raise CheckpointMismatch(
          f"the resume checkpoint at step {step} ({path}) is intact but does not fit the train "
          f"state of this version of icldyn: it holds {', '.join(extra[:3])}, which the state lacks")
    if not sealed and not self.read_only:
      seal(path)
    return jax.tree_util.tree_unflatten(treedef, [got[n] for n in names])

  def restore_latest_state(self, like: Any, trim_runs: bool = False
                           ) -> tuple[int | None, Any, list[tuple[CheckpointDamaged, str]]]:
    """The newest intact resume state, moving damaged newer ones to `damaged/`
    (`trim_runs` as in `restore_state`).

    Returns:
      (step, state, damaged): step and state are None when no resume state is
      intact; damaged lists (error, where the checkpoint was moved), newest first.
    """
    damaged = []
    for step in reversed(self.resume_steps()):
      try:
        return step, self.restore_state(step, like, trim_runs), damaged
      except CheckpointDamaged as e:
        damaged.append((e, self._discard("resume", step, into="damaged")))
    return None, None, damaged

  def stream_steps(self) -> list[int]:
    """Steps of the stream checkpoints."""
    self._settle()
    self.stream.reload()
    return sorted(self.stream.all_steps())

  def restore_params(self, step: int) -> Any:
    """Checks and restores the stacked params saved at `step`.

    Raises:
      CheckpointDamaged: a file differs from the manifest, or unreadable.
    """
    self._settle()
    self._verify("stream", step)
    try:
      with _OrbaxErrorsQuiet():
        return self.stream.restore(step, args=ocp.args.StandardRestore())
    except Exception as e:
      self._reopen("stream")
      raise CheckpointDamaged("stream", step, self.path("stream", step), _reason(e)) from e

  def close(self, abandon: bool = False) -> None:
    """Seals the save in flight, then closes the managers.

    Args:
      abandon: for a store closed while an error propagates: a save that
        cannot be finished is left unsealed (a later start redoes or ignores
        it) instead of raising over that error.
    """
    try:
      self._settle()
    except CheckpointWriteError:
      if not abandon:
        raise
    finally:
      self._quiet.exit()
      self.stream.close()
      self.resume.close()


def stream_steps(workdir: str, group: int) -> list[int]:
  """Steps (sequences) of a group's checkpoint stream (empty if it has none)."""
  base = os.path.join(os.path.abspath(workdir), wd_lib.CHECKPOINTS_DIR, f"g{group}", "stream")
  if not os.path.isdir(base):
    return []
  store = Store(workdir, group, read_only=True)
  try:
    return store.stream_steps()
  finally:
    store.close()


def stream(workdir: str, group: int = 0) -> Iterator[tuple[int, Any]]:
  """Iterates `(step, stacked params)` over a group's checkpoint stream, lazily.

  Raises:
    CheckpointDamaged: naming the step and path of a damaged checkpoint.
  """
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
  runs = np.shape(jax.tree.leaves(params)[0])[0]
  if not 0 <= index < runs:
    raise IndexError(f"run index {index} is out of range: group {group} has runs 0 to {runs - 1}")
  return jax.tree.map(lambda x: np.asarray(x)[index], params)
