"""Reading a trained workdir for analysis: config, run table, metric curves, checkpoints.

`open_workdir` rebuilds the grid exactly as training built it (config.json
→ `build.prepare`), so every run's static spec, props and shared arrays are
the ones it trained with. `stream` iterates a group's checkpoint stream
lazily, restoring the next checkpoint in a background thread while the
caller works on the current one; `restore_run` gives one run's params at
one step by its global run index.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue
import threading
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import pandas as pd

from icldyn import build
from icldyn import results
from icldyn import config as config_lib
from icldyn.errors import ConfigError
from icldyn.store import checkpoints as ckpt_lib
from icldyn.store import files as wd_lib

# runs.csv columns that are bookkeeping rather than settings of a run.
BOOKKEEPING = wd_lib.RUNS_BOOKKEEPING


@dataclasses.dataclass
class Workdir:
  """A trained workdir, as analysis sees it.

  Attributes:
    path: the directory.
    config: the resolved base config.
    axes: the grid axes.
    runs: runs.csv rows (strings), in run order.
    settings: the per-run setting columns of runs.csv (every column but
      run, group, group_index, status, diverged_step).
  """
  path: str
  config: ml_collections.ConfigDict
  axes: list[str]
  runs: list[dict[str, str]]
  settings: list[str]
  built: build.Prepared | None = None

  def prepared(self) -> build.Prepared:
    """The grid as `build.prepare` builds it (cached; the first call takes seconds)."""
    if self.built is None:
      self.built = build.prepare(self.config, self.axes)
      if self.built.num_runs != len(self.runs):
        raise ConfigError("--workdir", f"config.json makes {self.built.num_runs} runs "
                          f"but runs.csv lists {len(self.runs)}")
    return self.built

  def group_runs(self) -> dict[int, list[int]]:
    """group → its global run indices, in group order."""
    out: dict[int, list[int]] = collections.defaultdict(list)
    for r in sorted(self.runs, key=lambda r: (int(r["group"]), int(r["group_index"]))):
      out[int(r["group"])].append(int(r["run"]))
    return dict(out)

  def stream_steps(self, group: int) -> list[int]:
    """Steps (sequences) of a group's checkpoint stream."""
    return stream_steps(self.path, group)


def open_workdir(path: str) -> Workdir:
  """Reads config.json and runs.csv of a workdir (raises ConfigError if absent)."""
  if not os.path.isdir(path):
    raise ConfigError("--workdir", f"no such directory {path}")
  for name in (wd_lib.CONFIG_JSON, wd_lib.RUNS_CSV):
    if not os.path.isfile(os.path.join(path, name)):
      raise ConfigError("--workdir", f"{path} has no {name}; is it an icldyn train workdir?")
  with open(os.path.join(path, wd_lib.CONFIG_JSON)) as f:
    cfg, axes = config_lib.from_json(json.load(f))
  runs = wd_lib.read_csv(os.path.join(path, wd_lib.RUNS_CSV))
  runs.sort(key=lambda r: int(r["run"]))
  settings = [c for c in (runs[0].keys() if runs else []) if c not in BOOKKEEPING]
  return Workdir(path=path, config=cfg, axes=axes, runs=runs, settings=settings)


# --------------------------------------------------------------------------
# Metric curves.


@dataclasses.dataclass
class Curve:
  """One run's curve: steps ascending, repeated steps resolved to the last write."""
  steps: np.ndarray
  values: np.ndarray


def read_metrics(path: str, keep=None) -> dict[tuple[str, str], dict[int, Curve]]:
  """Curves of metrics.csv.

  Args:
    path: the workdir.
    keep: optional predicate `keep(evaluator, metric) -> bool`, called once
      per distinct pair in file order.

  Returns:
    {(evaluator, metric): {run: Curve}}; empty if there is no metrics.csv.
    A step logged twice keeps its last value; a torn last line of an
    interrupted run is dropped.
  """
  table = results.read_table(os.path.join(path, wd_lib.METRICS_CSV))
  if table is None or table.empty:
    return {}
  table = table.dropna(subset=["step", "run", "evaluator", "metric"])
  pairs = table[["evaluator", "metric"]].drop_duplicates().itertuples(index=False)
  kept = [tuple(p) for p in pairs if keep is None or keep(*p)]
  if not kept:
    return {}
  table = table[pd.MultiIndex.from_frame(table[["evaluator", "metric"]]).isin(kept)]
  table = table.drop_duplicates(["evaluator", "metric", "run", "step"], keep="last")
  out: dict[tuple[str, str], dict[int, Curve]] = {key: {} for key in kept}
  for (evaluator, metric, run), g in table.sort_values("step").groupby(
      ["evaluator", "metric", "run"], sort=False):
    out[(evaluator, metric)][int(run)] = Curve(g["step"].to_numpy(np.int64),
                                                g["value"].to_numpy(np.float64))
  return {k: v for k, v in out.items() if v}


# --------------------------------------------------------------------------
# Checkpoints.


def stream_steps(workdir: str, group: int) -> list[int]:
  """Steps of a group's checkpoint stream (empty if it has none)."""
  return ckpt_lib.stream_steps(workdir, group)


def stream(workdir: str, group: int = 0, steps: Sequence[int] | None = None,
           prefetch: int = 2) -> Iterator[tuple[int, Any]]:
  """Iterates `(step, stacked params [R, ...])` over a group's stream, lazily.

  Restoring (after checking each step against its manifest, as
  `checkpoint.Store.restore_params` does) runs in a background thread, up to
  `prefetch` checkpoints ahead (hashing, orbax and tensorstore release the
  GIL), so reading overlaps the caller's work; at most `prefetch + 1`
  checkpoints are in memory. A damaged checkpoint raises
  `checkpoint.CheckpointDamaged` in the caller's thread.

  Args:
    workdir: the workdir.
    group: the compile group.
    steps: steps to read (default: every step of the stream).
    prefetch: checkpoints restored ahead (0: restore in the caller's thread).
  """
  steps = list(stream_steps(workdir, group) if steps is None else steps)
  if prefetch <= 0:
    yield from _plain(workdir, group, steps)
    return
  q: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()

  def work():
    store = ckpt_lib.Store(workdir, group, read_only=True)
    try:
      for s in steps:
        if stop.is_set():
          return
        q.put((s, _restore(store, s), None))
    except BaseException as e:  # surfaced in the caller's thread
      q.put((None, None, e))
    finally:
      store.close()
    q.put(None)

  thread = threading.Thread(target=work, name="icldyn-stream", daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is None:
        return
      step, params, err = item
      if err is not None:
        raise err
      yield step, params
  finally:
    stop.set()
    while thread.is_alive():  # unblock a producer waiting on a full queue
      try:
        q.get(timeout=0.1)
      except queue.Empty:
        pass
    thread.join()


def _plain(workdir: str, group: int, steps: Sequence[int]):
  store = ckpt_lib.Store(workdir, group, read_only=True)
  try:
    for s in steps:
      yield s, _restore(store, s)
  finally:
    store.close()


def _restore(store: ckpt_lib.Store, step: int) -> Any:
  """Stacked params at `step` as numpy arrays, checked against the step's manifest.

  Raises:
    checkpoint.CheckpointDamaged: naming the step and path of a damaged checkpoint.
  """
  return jax.tree.map(np.asarray, store.restore_params(step))


def restore_run(workdir: str | Workdir, step: int, run: int) -> Any:
  """The params of global run `run` at `step` sequences (numpy leaves)."""
  wd = workdir if isinstance(workdir, Workdir) else open_workdir(workdir)
  row = next((r for r in wd.runs if int(r["run"]) == run), None)
  if row is None:
    raise IndexError(f"no run {run} in {wd.path}: its runs are 0 to {len(wd.runs) - 1}")
  return ckpt_lib.restore_run(wd.path, step, int(row["group"]), int(row["group_index"]))
