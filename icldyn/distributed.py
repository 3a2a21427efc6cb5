"""One grid over several processes (and hosts): start-up, agreement, gathering to process 0.

With `jax.distributed`, every process runs the same command: it builds the
same grid, joins one global device mesh, and steps the runs whose shards
live on its own devices (`sharding.run_mesh`, `step.make_programs`). What
crosses processes is kept to the host's decisions:

- per chunk of steps: whether to stop (a signal reached some process), one
  small all-gather (`first_signal`);
- at start: one exchange of each process's config fingerprint, requested
  process count and process 0's verdict on the workdir (`agree_start`);
- at events (evaluation, checkpoints, the end): the values process 0 writes
  (`to_host`, `to_host_later`, `merge_runs`), and at a resume the restored state, from
  process 0 to the others (`broadcast_tree`).

Process 0 is the only one that touches the workdir (config.json, runs.csv,
metrics.csv, tb/, checkpoints, the progress line), so the other hosts need
no shared file system, and a workdir written by N processes is the same as
one process's: it resumes with any process count and `icldyn analyze` reads
it in one process.

Launching (`initialize`): `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID` (JAX itself reads only the first), or a cluster JAX
detects (SLURM's `srun`, Open MPI's `mpirun`) with more than one task.
`launch_local` starts N local processes for testing (`icldyn train
--local-processes N`).

Faults: JAX's runtime aborts a process whose connection fails (a C++ fatal
error, not an exception), so start-up runs under a watchdog that reports an
unreachable coordinator or missing processes in one line, exit 2, before
the runtime's own, longer timeout. A process that dies during training makes
the others' next exchange fail: `PeerLost`, exit 75 (resume with the same
command). If process 0, which hosts JAX's coordination service, dies, JAX's
runtime aborts the others at once; `stop_when_coordinator_lost` turns that
abort into one line and exit 75 too. The workdir, written by process 0 alone
with atomic renames and fsyncs, resumes as after any kill.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from icldyn.errors import ConfigError

ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"
COUNT_ENV = "JAX_NUM_PROCESSES"
ID_ENV = "JAX_PROCESS_ID"
# Seconds every process may take to reach the coordinator at start-up (JAX's
# own default is 300; a job whose hosts start minutes apart may need more).
TIMEOUT_ENV = "ICLDYN_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT = 300
# Exit status when another process was lost mid-training (EX_TEMPFAIL, as a
# preemption: the same command resumes).
EXIT_PEER_LOST = 75

T = TypeVar("T")


class PeerLost(Exception):
  """Another process of the grid stopped (died) mid-training; the workdir is resumable."""


# --------------------------------------------------------------------------
# Start-up.


def _int_env(environ, name: str) -> int:
  value = environ.get(name, "")
  try:
    return int(value)
  except ValueError:
    raise ConfigError(name, f"must be an integer, got {value!r}") from None


def requested(environ=os.environ) -> dict | None:
  """The multi-process launch the environment asks for, or None for one process.

  Returns:
    {'coordinator_address', 'num_processes', 'process_id'} for the explicit
    form (missing values None, left to JAX's cluster detection), or {} for a
    cluster JAX detects itself (SLURM or Open MPI with more than one task).

  Raises:
    ConfigError: a variable that is not an integer, or a process id out of range.
  """
  if environ.get(ADDRESS_ENV):
    spec = {"coordinator_address": environ[ADDRESS_ENV], "num_processes": None,
            "process_id": None}
    if environ.get(COUNT_ENV):
      spec["num_processes"] = _int_env(environ, COUNT_ENV)
      if spec["num_processes"] < 1:
        raise ConfigError(COUNT_ENV, f"must be at least 1, got {spec['num_processes']}")
    if environ.get(ID_ENV):
      spec["process_id"] = _int_env(environ, ID_ENV)
    n, i = spec["num_processes"], spec["process_id"]
    if n is not None and i is not None and not 0 <= i < n:
      raise ConfigError(ID_ENV, f"{i} is not in 0..{n - 1} ({COUNT_ENV}={n})")
    return spec
  for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):  # JAX's SlurmCluster, OmpiCluster
    if environ.get(count, "1").isdigit() and int(environ.get(count, "1")) > 1:
      return {}
  return None


def timeout_s(environ=os.environ) -> int:
  """The start-up timeout in seconds (`ICLDYN_DISTRIBUTED_TIMEOUT`)."""
  if not environ.get(TIMEOUT_ENV):
    return DEFAULT_TIMEOUT
  t = _int_env(environ, TIMEOUT_ENV)
  if t < 1:
    raise ConfigError(TIMEOUT_ENV, f"must be a positive number of seconds, got {t}")
  return t


def _watchdog(seconds: int, what: str) -> threading.Event:
  """Ends the process with one line and exit 2 unless the returned event is set in time.

  JAX's runtime aborts on a failed connection (no exception reaches Python),
  so the clear message has to come first, from another thread.
  """
  done = threading.Event()

  def watch():
    if not done.wait(seconds):
      print(f"icldyn: error: {ADDRESS_ENV}: {what}; nothing was written", file=sys.stderr,
            flush=True)
      os._exit(2)

  threading.Thread(target=watch, name="icldyn-start-watchdog", daemon=True).start()
  return done


def initialize(environ=os.environ) -> bool:
  """Joins the processes of a multi-process launch (`requested`); True if distributed.

  Must run before anything starts JAX's back end (`icldyn train` calls it
  first). Idempotent. The coordinator address is checked while the watchdog
  runs: a process that cannot reach it, or a process 0 whose peers do not all
  arrive, within `ICLDYN_DISTRIBUTED_TIMEOUT` seconds prints one line and
  exits 2.

  Raises:
    ConfigError: bad launch variables, or JAX's back end already started.
  """
  if jax.distributed.is_initialized():
    return True
  spec = requested(environ)
  if spec is None:
    return False
  seconds = timeout_s(environ)
  address = spec.get("coordinator_address") or "the coordinator JAX found in the cluster"
  n = spec.get("num_processes")
  done = _watchdog(seconds, f"not all{'' if n is None else ' ' + str(n)} processes reached "
                   f"{address} within {seconds} s (is process 0 running there, and were "
                   f"{COUNT_ENV} processes started? {TIMEOUT_ENV} sets the wait)")
  try:
    # JAX's own timeout is set past the watchdog's, so the clear line comes first.
    jax.distributed.initialize(**spec, initialization_timeout=seconds + 60)
  except RuntimeError as e:  # raised before connecting: JAX's back end already started
    raise ConfigError(ADDRESS_ENV, f"set, but JAX cannot join the other processes: {e}; call "
                      "icldyn.distributed.initialize() before anything else uses JAX") from None
  finally:
    done.set()
  if spec.get("coordinator_address"):
    stop_when_coordinator_lost(spec["coordinator_address"])
  return True


# The C-level SIGABRT handler, kept referenced (ctypes frees a collected callback).
_ON_ABORT: list = []


def stop_when_coordinator_lost(address: str, wait_s: float = 5.0) -> None:
  """Makes JAX's abort on losing process 0 (the coordinator) one line and exit 75.

  When the process hosting JAX's coordination service dies, each other
  process's coordination client aborts at once from one of its own threads
  (SIGABRT, exit 134, no Python exception), whatever the main thread is
  doing. jaxlib 0.10 has a hook for this (`missed_heartbeat_callback`), but
  `jax.distributed.initialize` passes none and the binding cannot hand its
  status to Python (tried: std::bad_cast, abort). So the abort itself is
  caught, with a C-level handler: Python's `signal.signal` handler would
  never run, as abort() ends the process once a C handler returns.

  The handler tries to connect to `address`: if process 0 no longer
  accepts connections (refused, or no answer in `wait_s` seconds), it
  prints one line and exits 75, like a lost peer (`PeerLost`); otherwise
  the abort has another cause, and the default (exit 134) goes on.

  Args:
    address: the coordinator's "host:port" (`JAX_COORDINATOR_ADDRESS`).
    wait_s: how long to try to connect to it.
  """
  libc = ctypes.CDLL(None)
  libc.signal.restype = ctypes.c_void_p
  libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
  host, _, port = address.rpartition(":")
  host = host.strip("[]")  # an IPv6 literal

  def on_abort(signum):
    try:
      socket.create_connection((host, int(port)), timeout=wait_s).close()
    except (OSError, ValueError):
      sys.stderr.flush()
      os.write(2, f"icldyn: error: process 0 of the grid (the coordinator at {address}) "
               "stopped; the workdir is resumable: start every process again with the same "
               "command\n".encode())
      os._exit(EXIT_PEER_LOST)
    libc.signal(signal.SIGABRT, 0)  # SIG_DFL: abort() goes on to exit 134

  handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(on_abort)
  _ON_ABORT[:] = [handler]
  libc.signal(signal.SIGABRT, ctypes.cast(handler, ctypes.c_void_p))


def process_count() -> int:
  """Processes of the grid (1 without `jax.distributed`)."""
  return jax.process_count()


def is_primary() -> bool:
  """Whether this process writes the workdir (process 0)."""
  return jax.process_index() == 0


# --------------------------------------------------------------------------
# Exchanges between processes.


def _allgather_bytes(data: bytes, size: int) -> list[bytes]:
  """Every process's `data` (at most `size` bytes), in process order."""
  if len(data) > size:
    raise ValueError(f"{len(data)} bytes do not fit the exchange's {size}")
  buf = np.zeros(size + 4, np.uint8)
  buf[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
  buf[4:4 + len(data)] = np.frombuffer(data, np.uint8)
  rows = _collective(multihost_utils.process_allgather, buf)
  return [bytes(r[4:4 + int(np.frombuffer(r[:4].tobytes(), np.uint32)[0])]) for r in rows]


def _collective(fn: Callable, *args):
  """Runs a cross-process collective; a lost peer becomes `PeerLost`.

  `fn` must also wait for the result (JAX dispatches asynchronously, and a
  failed collective only raises where its result is read).
  """
  try:
    return fn(*args)
  except Exception as e:  # gloo / XLA runtime errors carry no finer type
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise PeerLost(f"another process of the grid stopped ({text[:200]})") from e


def fingerprint(resolved: dict) -> str:
  """A hash of a resolved config (the grid included), to compare across processes."""
  text = json.dumps(resolved, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def agree_start(check: Callable[[], T], resolved: dict, environ=os.environ) -> T:
  """Process 0's `check()` (the workdir verdict), after every process agrees to start.

  Every process sends its config fingerprint and the process count it was
  started with; process 0 also sends the result of `check()` or its error.
  Every process then raises the same `ConfigError`, or returns process 0's
  result, so they all stop (exit 2, nothing written) or all go on.
  """
  if process_count() == 1:
    return check()
  mine: dict[str, Any] = {"config": fingerprint(resolved), "count": environ.get(COUNT_ENV) or None}
  if is_primary():
    try:
      mine["result"] = check()
    except ConfigError as e:
      mine["error"] = [e.field, e.message]
  rows = [json.loads(b) for b in _allgather_bytes(json.dumps(mine).encode(), 4096)]
  n = process_count()
  for i, r in enumerate(rows):
    if r["count"] is not None and int(r["count"]) != n:
      raise ConfigError(COUNT_ENV, f"process {i} was started with {COUNT_ENV}={r['count']}, "
                        f"but {n} processes joined")
  for i, r in enumerate(rows[1:], 1):
    if r["config"] != rows[0]["config"]:
      raise ConfigError("--config", f"process {i} was started with a different config than "
                        f"process 0 (resolved config hash {r['config']} against "
                        f"{rows[0]['config']}); start every process with the same command")
  if "error" in rows[0]:
    field, message = rows[0]["error"]
    raise ConfigError(field, message)
  return rows[0]["result"]


def first_signal(local: int | None) -> int | None:
  """The first process's pending signal number (None if no process has one).

  Called by every process at the same point (between chunks), so all agree
  whether to stop; one all-gather of an int32 per process.
  """
  if process_count() == 1:
    return local
  got = _collective(multihost_utils.process_allgather, np.int32(local or 0))
  nonzero = [int(s) for s in np.ravel(got) if s]
  return nonzero[0] if nonzero else None


_REPLICATE: dict = {}


def _replicator(sharding):
  """One jitted identity per mesh whose result is on every device: a whole tree
  crosses in one program (`process_allgather` compiles and runs one per leaf)."""
  if sharding not in _REPLICATE:
    _REPLICATE[sharding] = jax.jit(lambda tree: tree, out_shardings=sharding)
  return _REPLICATE[sharding]


def to_host(tree):
  """A tree of (global) arrays as numpy on every process (`jax.device_get` with one)."""
  if process_count() == 1:
    return jax.device_get(tree)
  leaves = jax.tree.leaves(tree)
  mesh = getattr(leaves[0].sharding, "mesh", None) if leaves else None
  if mesh is None or not all(getattr(x.sharding, "mesh", None) == mesh for x in leaves):
    return _collective(multihost_utils.process_allgather, tree, True)
  replicate = _replicator(jax.sharding.NamedSharding(mesh, P()))

  def gather():  # the copy to numpy waits for the collective, so a lost peer shows here
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), replicate(tree))
  return _collective(gather)


_COPY = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def to_host_later(tree) -> Callable[[], Any]:
  """`to_host` in two halves: the device work starts now, the returned function waits for it.

  The tree is copied on its devices first (with several processes, gathered
  into replicated arrays), so the caller may donate `tree` to the next
  program right away: the host runs ahead of the device (`icldyn.runner`).
  The values are `to_host(tree)`'s exactly.
  """
  if process_count() == 1:
    copy = _COPY(tree)
    return lambda: jax.device_get(copy)
  leaves = jax.tree.leaves(tree)
  mesh = getattr(leaves[0].sharding, "mesh", None) if leaves else None
  if mesh is None or not all(getattr(x.sharding, "mesh", None) == mesh for x in leaves):
    host = to_host(tree)
    return lambda: host
  replicated = _collective(_replicator(jax.sharding.NamedSharding(mesh, P())), tree)
  return lambda: _collective(
      lambda: jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), replicated))


def local_part(x: jax.Array) -> np.ndarray:
  """A global array on the host: this process's shards filled in, zeros elsewhere.

  With one process, all of it (`jax.device_get`). Nothing crosses processes.
  """
  if process_count() == 1 or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  out = np.zeros(x.shape, x.dtype)
  for shard in x.addressable_shards:
    out[shard.index] = np.asarray(shard.data)
  return out


def owners(x: jax.Array, axis: int = 0) -> np.ndarray:
  """The process holding each index of `x` along `axis` (one entry per index)."""
  out = np.zeros(x.shape[axis], np.int32)
  for device, index in x.sharding.devices_indices_map(x.shape).items():
    out[index[axis]] = device.process_index
  return out


def merge_runs(local: np.ndarray, owner: np.ndarray) -> np.ndarray:
  """Entry i of `local` from process `owner[i]` (leading axis), exactly, on every process.

  Exchanged as bytes, so float64 survives JAX's default 32-bit mode.
  """
  if process_count() == 1:
    return local
  local = np.ascontiguousarray(local)
  rows = _collective(multihost_utils.process_allgather, local.view(np.uint8).reshape(-1))
  rows = np.asarray(rows).view(local.dtype).reshape((-1,) + local.shape)
  return rows[owner, np.arange(local.shape[0])]


def broadcast_tree(tree, like):
  """Process 0's `tree` (or None) on every process, leaves shaped like `like`'s, exactly."""
  if process_count() == 1:
    return tree
  found = is_primary() and tree is not None
  found = bool(np.ravel(_collective(multihost_utils.process_allgather, np.int32(found)))[0])
  if not found:
    return None
  leaves, treedef = jax.tree.flatten(like)
  sizes = [np.asarray(l).nbytes for l in leaves]
  if is_primary():  # every leaf's bytes in one buffer: one collective for the tree
    mine = np.concatenate([np.ascontiguousarray(np.asarray(a, np.asarray(l).dtype))
                           .view(np.uint8).reshape(-1)
                           for a, l in zip(jax.tree.leaves(tree), leaves)] or [np.zeros(0, np.uint8)])
  else:
    mine = np.zeros(sum(sizes), np.uint8)
  # The broadcast is a sum in which only process 0's bytes are nonzero; JAX
  # may widen the sum's dtype, so narrow back to bytes before reinterpreting.
  got = _collective(lambda: np.asarray(multihost_utils.broadcast_one_to_all(mine)))
  got = got.astype(np.uint8)
  out, at = [], 0
  for size, l in zip(sizes, leaves):
    out.append(got[at:at + size].view(np.asarray(l).dtype).reshape(np.shape(l)))
    at += size
  return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------
# Local launcher (tests, one host with several processes).


def free_port() -> int:
  """A TCP port free on this host now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


LOCAL_FLAG = "--local-processes"


def without_local_flag(argv: list[str]) -> list[str]:
  """`argv` without `--local-processes N` (or `--local-processes=N`): a child must
  not launch children of its own."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == LOCAL_FLAG:
      skip = True
    elif not a.startswith(LOCAL_FLAG + "="):
      out.append(a)
  return out


def launch_local(argv: list[str], n: int, environ=os.environ, timeout: float | None = None) -> int:
  """Runs `python -m icldyn ARGV` (less `--local-processes N`) as N processes of one grid
  on this host.

  Each child gets the coordinator address (a free local port), the process
  count and its id; stdout and stderr pass through. SIGTERM/SIGINT are
  forwarded to every child (each writes its part of the resume checkpoint).

  Returns:
    Process 0's exit status, or the first child's nonzero one if process 0's is 0.
  """
  if n < 1:
    raise ConfigError("--local-processes", f"must be at least 1, got {n}")
  address = f"127.0.0.1:{free_port()}"
  argv = without_local_flag(argv)
  if any(a == LOCAL_FLAG or a.startswith(LOCAL_FLAG + "=") for a in argv):
    raise ConfigError(LOCAL_FLAG, "given twice")
  children = []
  for i in range(n):
    env = dict(environ, **{ADDRESS_ENV: address, COUNT_ENV: str(n), ID_ENV: str(i)})
    children.append(subprocess.Popen([sys.executable, "-m", "icldyn", *argv], env=env))

  def forward(signum, frame):
    for c in children:
      if c.poll() is None:
        c.send_signal(signum)

  old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    deadline = None if timeout is None else time.time() + timeout
    codes = []
    for c in children:
      left = None if deadline is None else max(deadline - time.time(), 0.1)
      codes.append(c.wait(timeout=left))
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    for c in children:
      if c.poll() is None:
        c.kill()
        c.wait()
  codes = [c if c >= 0 else 128 - c for c in codes]
  return codes[0] or next((c for c in codes if c), 0)
