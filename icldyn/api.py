"""The Python API: a workdir's runs, tables, parameters, batches and activations, and the commands as functions.

    import icldyn
    wd = icldyn.load("runs/demo")                 # a trained workdir
    run = wd.run(0)
    logits, cache = run.forward(run.params(wd.steps[-1]), run.batch(size=64))
    cache["layer_1/attn/pattern"]                 # [64, H, T, T]

`load` gives a `Workdir` (tables as pandas DataFrames, checkpoint steps,
whole-grid forms of every call) and `Workdir.run(i)` a `Run` (its settings,
parameters at a step, its checkpoint stream, batches of its own data, and
its forward pass with every activation in a `Cache`). `train`, `analyze`
and `plot` do what the commands of the same names do and return what they
wrote. docs/python_api.md is the user's guide, with shapes.

Everything here reads the workdir the way training wrote it: the grid is
rebuilt from config.json, so a run's model, task, data and clamps are the
ones it trained with, and `Run.forward` is the training program's forward
pass (under the run's training clamps unless told otherwise).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import pandas as pd

from icldyn import clamps as clamps_lib
from icldyn import config as config_lib
from icldyn import model as model_lib
from icldyn import pipeline, plots, report, runner, studies
from icldyn import step as train_lib
from icldyn.analysis import command as analysis_command
from icldyn.analysis import loader
from icldyn.errors import ConfigError, did_you_mean
from icldyn.store import checkpoints as ckpt_lib
from icldyn.store import files as wd_lib

DEFAULT_BATCH = 256  # sequences of `Run.batch` (the analysis batch of `icldyn analyze`)


# --------------------------------------------------------------------------
# Forward passes (compiled once per model, clamp plan and kept names).


@functools.lru_cache(maxsize=32)
def _forward_program(static: train_lib.Static, mode: str, plan, keep: tuple[str, ...] | None,
                     grid: bool, shared_batch: bool):
  """A jitted forward pass: one run, or vmapped over a group's runs.

  `mode`: 'train' (the run's training clamps), 'plan' (a fixed plan),
  'tree' (a clamp tree passed as an argument) or 'none'.
  """
  def one(params, batch, props, tree):
    n = props.data.num_outputs
    if mode == "train":
      logits, acts = train_lib.forward(static, params, batch, props, static.plan)
    elif mode == "plan":
      logits, acts = plan.forward(static.model, params, batch, n, None)
    else:
      logits, acts = model_lib.apply(static.model, params, batch, n, tree)
    return logits, model_lib.Cache.from_acts(acts, keep)

  if grid:
    return jax.jit(jax.vmap(one, in_axes=(0, None if shared_batch else 0, 0, None)))
  return jax.jit(one)


def _clamp_mode(static: train_lib.Static, clamps) -> tuple[str, Any, Any]:
  """(mode, fixed plan, clamp tree) of `forward`'s `clamps` argument."""
  if clamps is None:
    return ("train" if static.plan is not None else "none"), None, None
  if isinstance(clamps, dict):
    return "tree", None, clamps_lib.custom.nest(clamps)
  specs = clamps_lib.parse(clamps, "clamps") if isinstance(clamps, str) else tuple(clamps)
  if not specs:
    return "none", None, None
  return "plan", clamps_lib.fixed_plan(static.model, specs, "clamps"), None


def _numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


# --------------------------------------------------------------------------
# One run.


class Run:
  """One run of a workdir: settings, checkpoints, data and forward pass.

  Attributes:
    index: the run's index (runs.csv `run`).
    group, group_index: its compile group and place in it.
    settings: its per-run settings (runs.csv's setting columns, typed).
    spec: its model (`icldyn.model.ModelSpec`).
  """

  def __init__(self, workdir: "Workdir", index: int):
    self.workdir = workdir
    self.index = index
    row = workdir.runs.loc[workdir.runs["run"] == index].iloc[0]
    self.group, self.group_index = int(row["group"]), int(row["group_index"])
    self.settings = {k: _plain(row[k]) for k in workdir.setting_names}
    self.status = str(row.get("status", ""))

  def __repr__(self) -> str:
    return f"Run({self.index}, group={self.group}, settings={self.settings})"

  # -- what it trained with

  @property
  def prepared_group(self):
    """The run's compile group as training built it (`icldyn.build.PreparedGroup`)."""
    return self.workdir.prepared_group(self.group)

  @property
  def static(self) -> train_lib.Static:
    """The group's static spec (model, task, clamp plan)."""
    return self.prepared_group.static

  @property
  def spec(self) -> model_lib.ModelSpec:
    return self.static.model

  @property
  def props(self) -> train_lib.Props:
    """The run's per-run settings as arrays (`icldyn.step.Props`)."""
    return jax.tree.map(lambda x: np.asarray(x)[self.group_index], self.prepared_group.props)

  # -- checkpoints

  @property
  def steps(self) -> list[int]:
    """Steps (training sequences) of the run's checkpoint stream."""
    return self.workdir.group_steps(self.group)

  def params(self, step: int) -> Any:
    """The run's parameters at an exact checkpoint step (numpy leaves).

    Raises:
      icldyn.store.checkpoints.CheckpointNotFound: no checkpoint at `step`
        (the message lists the nearest steps).
    """
    return ckpt_lib.restore_run(self.workdir.path, int(step), self.group, self.group_index)

  def stream(self, steps: Sequence[int] | None = None) -> Iterator[tuple[int, Any]]:
    """`(step, params)` over the run's checkpoint stream, lazily (the next
    checkpoint is restored in the background while you work on this one)."""
    for step, stacked in loader.stream(self.workdir.path, self.group, steps):
      yield step, jax.tree.map(lambda x: x[self.group_index], stacked)

  # -- data

  def batch(self, evaluator: str | None = None, size: int = DEFAULT_BATCH,
            seed: int | None = None, step: int = 0) -> Any:
    """A batch of the run's own data (numpy; works outside `jit`).

    Args:
      evaluator: an evaluator of the run's task (default: the one
        `icldyn analyze` reads, e.g. `fsl_train`), or 'train' for the
        training batch of optimizer step `step`.
      size: sequences (ignored for 'train': the config's batch size).
      seed: None: the first `size` sequences of the run's own evaluation set
        (what training evaluated); an int: a fresh set from that seed.
      step: the optimizer step of a 'train' batch (0-based).

    Returns:
      The task's batch, fields `[size, ...]` (docs/interfaces.md).
    """
    stacked = self.workdir.sample(self.group, evaluator, size, seed, step, [self.group_index])
    return jax.tree.map(lambda x: x[0], stacked)

  # -- forward

  def forward(self, params, batch, clamps=None, names: Sequence[str] | None = None
              ) -> tuple[np.ndarray, model_lib.Cache]:
    """The run's forward pass with every activation.

    Args:
      params: the run's parameters (`Run.params(step)`).
      batch: a batch of its task (`Run.batch(...)`), fields `[B, ...]`.
      clamps: None: the run's training clamps, as in training; otherwise
        exactly these instead: clamp constructors (`icldyn.clamps`,
        `icldyn.custom_clamp`), their config text
        (`"ablate(layer=1, heads=[0])"`), `[]` for none, or a clamp tree
        `{name: Clamp(value, mask)}` by activation name.
      names: keep only these activations (see `icldyn.model.cache.keep_names`),
        so a large batch fits in memory.

    Returns:
      (logits `[B, R, L]`, Cache of `[B, ...]` arrays), numpy.
    """
    mode, plan, tree = _clamp_mode(self.static, clamps)
    fn = _forward_program(self.static, mode, plan, tuple(names) if names else None, False, False)
    return _numpy(fn(params, batch, self.props, tree))


def _plain(v: Any) -> Any:
  """A pandas cell as a plain Python value (NaN as None)."""
  if isinstance(v, np.generic):
    v = v.item()
  if isinstance(v, float) and np.isnan(v):
    return None
  return v


# --------------------------------------------------------------------------
# A workdir.


class Workdir:
  """A trained workdir (see `load`).

  Attributes:
    path: the directory.
    config: the resolved base config (`ml_collections.ConfigDict`).
    axes: the grid axes.
    runs: runs.csv as a DataFrame (one row per run).
    setting_names: the per-run setting columns of runs.csv.
  """

  def __init__(self, path: str):
    self._loaded = loader.open_workdir(path)
    self.path = self._loaded.path
    self.config: ml_collections.ConfigDict = self._loaded.config
    self.axes = list(self._loaded.axes)
    self.runs = pd.read_csv(os.path.join(self.path, wd_lib.RUNS_CSV), keep_default_na=False,
                            na_values=[""]).sort_values("run").reset_index(drop=True)
    self.setting_names = list(self._loaded.settings)

  def __repr__(self) -> str:
    return f"Workdir({self.path!r}, {len(self.runs)} runs, steps {self.steps[:1]}..{self.steps[-1:]})"

  @property
  def num_runs(self) -> int:
    return len(self.runs)

  def run(self, index: int) -> Run:
    """Run `index` (IndexError naming the range if there is none)."""
    ids = self.runs["run"].tolist()
    if index not in ids:
      raise IndexError(f"run index {index} is out of range: {self.path} has runs "
                       f"{min(ids)} to {max(ids)}")
    return Run(self, int(index))

  def __iter__(self) -> Iterator[Run]:
    """Every run, in run order."""
    return (self.run(int(i)) for i in self.runs["run"])

  def group_runs(self, group: int = 0) -> list[int]:
    """The run indices of a compile group, in group order (its leading axis)."""
    rows = self.runs.loc[self.runs["group"] == group].sort_values("group_index")
    if rows.empty:
      groups = sorted(set(self.runs["group"]))
      raise IndexError(f"no group {group} in {self.path}: its groups are {groups}")
    return [int(r) for r in rows["run"]]

  def prepared_group(self, group: int):
    """A compile group as training built it (`icldyn.build.PreparedGroup`; built
    once, taking seconds)."""
    self.group_runs(group)
    return self._loaded.prepared().groups[group]

  # -- tables

  @functools.cached_property
  def metrics(self) -> pd.DataFrame:
    """metrics.csv, long format: step, run, evaluator, metric, value."""
    df = self._read(wd_lib.METRICS_CSV, "icldyn train")
    return df.drop_duplicates(["step", "run", "evaluator", "metric"], keep="last")

  def logged(self, evaluator: str, metric: str) -> pd.DataFrame:
    """One logged metric of metrics.csv as a table: index (run, step), one
    column, or one per head (columns 0..H-1) for per-head metrics
    (`induction_strength.h{h}`).

    Raises:
      KeyError: no such metric (naming those the evaluator has).
    """
    m = self.metrics[self.metrics["evaluator"] == evaluator]
    names = m["metric"]
    heads = names.str.fullmatch(rf"{re.escape(metric)}\.h\d+")
    if heads.any():
      m = m[heads].assign(head=names[heads].str.rsplit(".h", n=1).str[1].astype(int))
      return m.pivot_table(index=["run", "step"], columns="head", values="value")
    if not (names == metric).any():
      have = sorted({re.sub(r"\.h\d+$", "", n) for n in names})
      raise KeyError(f"no metric {metric!r} of evaluator {evaluator!r} in metrics.csv"
                     f"{did_you_mean(metric, have)} (it has: {', '.join(have) or 'none'})")
    return m[names == metric].pivot_table(index=["run", "step"], values="value")[["value"]]

  @property
  def progress(self) -> pd.DataFrame:
    """analysis/progress.csv: step, run, measure, layer, head, layer2, head2, value."""
    return self._read(wd_lib.PROGRESS_CSV, "icldyn analyze")

  @property
  def phase_changes(self) -> pd.DataFrame:
    """analysis/phase_changes.csv: one row per run, curve and estimator."""
    return self._read(wd_lib.PHASE_CHANGES_CSV, "icldyn analyze")

  @property
  def summary(self) -> pd.DataFrame:
    """analysis/summary.csv: timings over seeds per setting, curve and estimator."""
    return self._read(wd_lib.SUMMARY_CSV, "icldyn analyze")

  def _read(self, name: str, command: str) -> pd.DataFrame:
    file = os.path.join(self.path, name)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{self.path} has no {name}; write it with "
                              f"`{command} --workdir {self.path}`")
    return pd.read_csv(file, on_bad_lines="skip")  # a torn last line of a killed run

  # -- checkpoints

  def group_steps(self, group: int = 0) -> list[int]:
    """Steps of a group's checkpoint stream."""
    self.group_runs(group)
    return ckpt_lib.stream_steps(self.path, group)

  @property
  def steps(self) -> list[int]:
    """Checkpoint steps (training sequences) every group has."""
    groups = sorted(set(int(g) for g in self.runs["group"]))
    common = set(self.group_steps(groups[0]))
    for g in groups[1:]:
      common &= set(self.group_steps(g))
    return sorted(common)

  def params(self, step: int, group: int = 0) -> Any:
    """A group's parameters at a step, stacked `[N, ...]` over `group_runs(group)`."""
    self.group_runs(group)
    store = ckpt_lib.Store(self.path, group, read_only=True)
    try:
      return jax.tree.map(np.asarray, store.restore_params(int(step)))
    finally:
      store.close()

  def stream(self, group: int = 0, steps: Sequence[int] | None = None
             ) -> Iterator[tuple[int, Any]]:
    """`(step, params [N, ...])` over a group's checkpoint stream, lazily."""
    self.group_runs(group)
    return loader.stream(self.path, group, steps)

  # -- data and forward, whole group

  def sample(self, group: int, evaluator: str | None, size: int, seed: int | None,
             step: int, indices: Sequence[int] | None = None) -> Any:
    """Batches of a group's runs (see `batch`), for the runs at `indices` of the group."""
    pg = self.prepared_group(group)
    static = pg.static
    task = config_lib.task_of(self.config)
    evaluator = evaluator or static.task.analysis_evaluator
    known = ("train",) + tuple(task.evaluators)
    if evaluator not in known:
      raise ConfigError("evaluator", f"unknown evaluator {evaluator!r} of task {task.name}"
                        f"{did_you_mean(evaluator, known)} (known: {', '.join(known)})")
    props = pg.props if indices is None else jax.tree.map(
        lambda x: np.asarray(x)[np.asarray(indices)], pg.props)
    fn = _sampler(static, evaluator, int(size), seed is not None)
    return _numpy(fn(pg.table, props, np.int32(step), np.uint32(seed or 0)))

  def batch(self, group: int = 0, evaluator: str | None = None, size: int = DEFAULT_BATCH,
            seed: int | None = None, step: int = 0) -> Any:
    """Each run's batch (`Run.batch`'s arguments), fields `[N, size, ...]`."""
    return self.sample(group, evaluator, size, seed, step)

  def forward(self, step_or_params, batch=None, group: int = 0, clamps=None,
              names: Sequence[str] | None = None) -> tuple[np.ndarray, model_lib.Cache]:
    """`Run.forward` of every run of a group in one vmapped program.

    Args:
      step_or_params: a checkpoint step, or stacked params `[N, ...]`.
      batch: fields `[N, B, ...]` (each run its own, e.g. `batch(group)`,
        the default) or `[B, ...]` (the same batch for every run).
      group: the compile group.
      clamps, names: as `Run.forward` (the same clamps for every run).

    Returns:
      (logits `[N, B, R, L]`, Cache of `[N, B, ...]` arrays), numpy, in the
      order of `group_runs(group)`.
    """
    params = (self.params(step_or_params, group) if np.ndim(step_or_params) == 0
              and not isinstance(step_or_params, dict) else step_or_params)
    if batch is None:
      batch = self.batch(group)
    pg = self.prepared_group(group)
    one = jax.eval_shape(lambda: jax.tree.map(lambda x: x[0], batch))
    single = jax.eval_shape(lambda t, p: pg.static.task.sample(
        jax.random.PRNGKey(0), t, p.data, pg.static.task.analysis_evaluator, 2),
        pg.table, jax.tree.map(lambda x: x[0], pg.props))
    shared = jax.tree.leaves(one)[0].ndim < jax.tree.leaves(single)[0].ndim
    mode, plan, tree = _clamp_mode(pg.static, clamps)
    fn = _forward_program(pg.static, mode, plan, tuple(names) if names else None, True, shared)
    return _numpy(fn(params, batch, pg.props, tree))


@functools.lru_cache(maxsize=32)
def _sampler(static: train_lib.Static, evaluator: str, size: int, seeded: bool):
  """A jitted sampler of a group's batches, vmapped over its runs."""
  def one(table, props, step, seed):
    if evaluator == "train":
      return train_lib.train_batch(static, table, props, step)
    key = (jax.random.fold_in(jax.random.PRNGKey(seed), props.eval_seed) if seeded
           else train_lib.eval_key(static, props.eval_seed, evaluator))
    return static.task.sample(key, table, props.data, evaluator, size)

  return jax.jit(jax.vmap(one, in_axes=(None, 0, None, None)))


def load(workdir: str) -> Workdir:
  """Opens a trained workdir.

  Raises:
    icldyn.errors.ConfigError: the directory does not exist or is not an
      icldyn workdir (no config.json or runs.csv).
  """
  return Workdir(os.fspath(workdir))


# --------------------------------------------------------------------------
# The commands as functions.


def load_config(study: str | ml_collections.ConfigDict, **overrides: Any
                ) -> ml_collections.ConfigDict:
  """A study's config by name (`"ih_paper:smoke"`) or path (`"my_study.py:arg"`),
  with dotted overrides (`load_config("demo", **{"train.learning_rate": 1e-4})`)."""
  cfg = (study if isinstance(study, ml_collections.ConfigDict) else studies.load(study))
  for field, value in overrides.items():
    config_lib.set_field(cfg, field, value)
  return cfg


def train(config: str | ml_collections.ConfigDict, workdir: str,
          grid: Sequence[str] | None = None, quiet: bool = True, overwrite: bool = False,
          callbacks=None, **overrides: Any) -> Workdir:
  """`icldyn train`: trains (or resumes) a grid into `workdir` and opens it.

  Args:
    config: a study name or path (see `load_config`) or a ConfigDict.
    workdir: output directory.
    grid: axes replacing the study's (`["seeds.init=0,1,2"]`).
    quiet: no progress lines.
    overwrite: replace a workdir that holds a different config.
    callbacks: `icldyn.Callbacks` (or objects with some of its methods),
      called at each evaluation, stream checkpoint and group end with an
      `icldyn.TrainingEvent`, for logging elsewhere.
    **overrides: dotted config fields (`**{"train.num_sequences": 4000}`).
  """
  cfg = load_config(config, **overrides)
  runner.train(cfg, workdir, list(grid) if grid else None, quiet=quiet, overwrite=overwrite,
               callbacks=callbacks)
  return load(workdir)


def analyze(workdir: str, measures=None, curves: Sequence[str] | None = None,
            quiet: bool = True, **options: Any) -> dict[str, Any]:
  """`icldyn analyze`: progress measures (built-in and your own), phase-change timing and summary.

  Args:
    workdir: a trained workdir.
    measures: as `--measures` (names, 'all'), plus custom measures:
      functions `fn(params, cache, batch)`, registered names, `module:function`
      (`icldyn.analysis.custom`).
    curves: as `--curve`.
    quiet: no timing table on stdout.
    **options: the rest of `icldyn.analysis.command.analyze` (eval_size,
      clamps, estimators, n_boot, chunk).

  Returns:
    {'progress', 'phase_changes', 'summary': paths written, 'measures',
    'curves', 'checkpoints', 'seconds'}.
  """
  return analysis_command.analyze(os.fspath(workdir), measures, curves, quiet, **options)


def plot(workdir: str, pdf: bool = False, runs: Sequence[int] | None = None,
         steps: Sequence[int] | None = None, time_axis: str = "auto") -> list[str]:
  """`icldyn plot`: the figures of a workdir and its report.md; the paths written.

  `runs` and `steps` choose the attention patterns drawn (default: run 0 at
  its first checkpoint, nearest its phase change, and its last);
  `time_axis` ('auto', 'log', 'linear') the training-time axis of every figure.
  """
  workdir = os.fspath(workdir)
  loader.open_workdir(workdir)  # refuses a directory that is not a workdir
  pipeline.attention_patterns(workdir, runs, steps)
  figures = plots.make_all(workdir, pdf=pdf, time_axis=time_axis)
  return list(figures) + [report.write_report(workdir)]
