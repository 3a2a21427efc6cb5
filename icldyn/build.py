"""From a config to what a grid compiles: static specs, per-run props, shared arrays, clamp plans.

This is the one place that turns configuration into the objects the rest of
icldyn computes with: `model_spec(cfg)` (the model and the task's front
end), `static(cfg, ...)` (everything shape-level of a compile group),
`props(...)` (per-run arrays) and `prepare(cfg, axes)`, which expands and
validates a whole grid and builds every group before anything is written.
Graft donors given by workdir are loaded here too (`load_donor`), since a
donor's model is rebuilt from its own config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from icldyn import clamps as clamps_lib
from icldyn import config as config_lib
from icldyn import grid as grid_lib
from icldyn import model as model_lib
from icldyn import step as train_lib
from icldyn.errors import ConfigError
from icldyn.store import checkpoints as ckpt_lib
from icldyn.store import files


def model_spec(cfg) -> model_lib.ModelSpec:
  """The model of a (capacity-padded) config, with its task's front end."""
  m = cfg.model
  return model_lib.ModelSpec(
      num_layers=m.num_layers, num_heads=m.num_heads, d_model=m.d_model,
      front=config_lib.task_of(cfg).front(cfg),
      pos_embedding=m.pos_embedding, layer_norm=m.layer_norm, mlp_ratio=m.mlp_ratio,
      rope_base=m.rope_base)


def static(cfg, plan=None, eval_plans=()) -> train_lib.Static:
  """The static description of a group from its (capacity-padded) config."""
  t = cfg.train
  eval_batch = min(cfg.eval.batch, cfg.eval.size)
  task = config_lib.task_of(cfg).spec(cfg, t.batch_size, eval_batch,
                                      config_lib.eval_names(cfg))
  total = -(-t.num_sequences // t.batch_size)
  scan = t.scan_steps or max(1, min(total, -(-t.eval_every // t.batch_size), 200))
  return train_lib.Static(
      model=model_spec(cfg), task=task, batch_size=t.batch_size, eval_size=cfg.eval.size,
      eval_batch=eval_batch, optimizer=t.optimizer, b1=t.b1, b2=t.b2, eps=t.eps,
      scan_steps=scan, plan=plan, eval_plans=tuple(eval_plans),
      clamp_evaluators=tuple(config_lib.clamp_evaluators(cfg)),
      matmul_precision=t.matmul_precision)


def props(settings: list[dict], cfg, clamp_params=None) -> train_lib.Props:
  """Stacked per-run props (numpy, leading run axis) of a group."""
  return train_lib.Props(
      init_seed=np.asarray([s["seeds.init"] for s in settings], np.uint32),
      data_seed=np.asarray([s["seeds.data"] for s in settings], np.uint32),
      eval_seed=np.asarray([s["seeds.eval"] for s in settings], np.uint32),
      learning_rate=np.asarray([s["train.learning_rate"] for s in settings], np.float32),
      weight_decay=np.asarray([s["train.weight_decay"] for s in settings], np.float32),
      data=config_lib.task_of(cfg).props(settings, cfg),
      clamp=clamp_params)


def validate_clamps(cfg) -> None:
  """Checks one run's clamp fields against its model (donors not loaded)."""
  clamps_lib.validate(cfg, model_spec(cfg))


def validate(cfg) -> None:
  """Checks one run's whole config: `config.validate`, then its clamps."""
  config_lib.validate(cfg)
  validate_clamps(cfg)


# --------------------------------------------------------------------------
# A whole grid.


@dataclasses.dataclass
class PreparedGroup:
  """One compile group, built: its runs, static spec, per-run props and shared arrays."""
  group: grid_lib.Group
  static: train_lib.Static
  props: train_lib.Props
  table: Any


@dataclasses.dataclass
class Prepared:
  """A validated grid, ready to train; nothing written yet."""
  config: Any
  axes: list[str]
  fields: list[str]
  groups: list[PreparedGroup]
  num_runs: int

  def resolved(self) -> dict:
    """What config.json holds: the base config, the grid axes, and the task's
    facts for the figures (`Task.facts`)."""
    return {"config": json.loads(config_lib.to_json(self.config)), "grid": list(self.axes),
            "task": config_lib.task_of(self.config).facts()}


def check_known_fields(cfg) -> None:
  """Refuses fields that base_config lacks (a study can add them by typo inside `unlocked()`)."""
  def walk(node, base, prefix):
    for key in node.keys():
      field = f"{prefix}{key}"
      if key not in base:
        raise ConfigError(field, "unknown config field (not in icldyn.config.base_config)"
                          + config_lib.suggest_field(base, key, prefix))
      if isinstance(base[key], ml_collections.ConfigDict):
        if not isinstance(node[key], ml_collections.ConfigDict):
          raise ConfigError(field, f"must be a group of fields, got {node[key]!r}")
        walk(node[key], base[key], f"{field}.")
  walk(cfg, config_lib.base_config(), "")


def prepare(cfg, axes: list[str] | None = None) -> Prepared:
  """Expands, validates and builds every group of a grid (raises ConfigError)."""
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError("--config", f"the config must be an ml_collections.ConfigDict, "
                      f"got {type(cfg).__name__}")
  check_known_fields(cfg)
  axes = list(axes) if axes else list(cfg.grid)
  runs = grid_lib.expand(cfg, axes)
  if not runs:
    raise ConfigError("--grid", "the grid is empty")
  for run in runs:
    validate_clamps(run)
  fields = grid_lib.grid_fields(cfg, axes)
  groups = []
  for g in grid_lib.make_groups(runs, fields):
    plan, clamp_params, eval_plans = clamps_lib.plans_for_group(
        g.config, g.settings, model_spec(g.config), load_donor)
    st = static(g.config, plan, eval_plans)
    task = config_lib.task_of(g.config)
    groups.append(PreparedGroup(g, st, props(g.settings, g.config, clamp_params),
                                task.shared(g.config)))
  return Prepared(config=cfg, axes=axes, fields=fields, groups=groups, num_runs=len(runs))


# --------------------------------------------------------------------------
# Graft donors.


@functools.lru_cache(maxsize=16)
def load_donor(workdir: str, run: int = 0, step: int = -1) -> tuple[model_lib.ModelSpec, Any]:
  """A donor's model spec and parameters from an icldyn workdir's checkpoint stream.

  The donor's model is rebuilt from its own config.json (its grid expanded
  as training expanded it), so it carries the donor's task and sizes.

  Args:
    workdir: the donor's workdir.
    run: the donor's run index (runs.csv).
    step: training sequences of the stream checkpoint; -1 = the newest.

  Returns:
    (ModelSpec, params as numpy arrays).

  Raises:
    ValueError: the donor cannot be read (the clamp's resolve names it).
  """
  try:
    with open(os.path.join(workdir, files.CONFIG_JSON)) as f:
      cfg, axes = config_lib.from_json(json.load(f))
    rows = {int(r["run"]): r for r in files.read_csv(os.path.join(workdir, files.RUNS_CSV))}
  except (OSError, KeyError, ValueError) as e:
    raise ValueError(f"cannot read the donor workdir {workdir!r}: {e}") from e
  if run not in rows:
    raise ValueError(f"the donor workdir has no run {run}")
  group, index = int(rows[run]["group"]), int(rows[run]["group_index"])
  try:
    groups = grid_lib.make_groups(grid_lib.expand(cfg, axes), grid_lib.grid_fields(cfg, axes))
    spec = model_spec(groups[group].config)
  except (ConfigError, IndexError) as e:
    raise ValueError(f"cannot rebuild the donor's model from {workdir!r}: {e}") from e
  steps = ckpt_lib.stream_steps(workdir, group)
  if not steps:
    raise ValueError(f"the donor workdir {workdir!r} has no stream checkpoints")
  if step < 0:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"no donor checkpoint at step {step} (have {steps})")
  params = ckpt_lib.restore_run(workdir, step, group, index)
  return spec, jax.tree.map(np.asarray, params)
