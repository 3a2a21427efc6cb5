"""Grids: a product (and zips) of config fields → the run table and compile groups.

A grid axis is `FIELD=V1,V2,...` (product) or `F1+F2=A1/B1,A2/B2` (zipped
fields). Fields that do not change array shapes are per-run data: they become
arrays on a leading run axis. Fields that do (layers, heads, width, context
length, ...) split the grid into groups, each compiled once. Which task
fields are per-run, and which per-run sizes are padded to the group's
largest value (training classes, labels, vocabulary), the task says
(`icldyn.tasks.base.Task`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from typing import Any

import ml_collections

from icldyn import config as config_lib
from icldyn.errors import ConfigError

# Fields of every task that are data on the run axis (no recompile); a task
# adds its own between the optimizer's and the clamps' (runs.csv column order).
RUN_FIELDS = ("seeds.init", "seeds.data", "seeds.eval", "train.learning_rate",
              "train.weight_decay")
CLAMP_FIELDS = ("clamp.keep_head", "clamp.condition", "clamp.strength", "clamps")


def per_run_fields(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Every per-run field of a config's task, in runs.csv column order."""
  return RUN_FIELDS + config_lib.task_of(cfg).per_run_fields + CLAMP_FIELDS


@dataclasses.dataclass
class Group:
  """Runs that share one compiled program.

  Attributes:
    index: group number.
    config: the group's static config (per-run sizes at the group's maximum).
    runs: global run indices.
    settings: per-run flat settings (dotted field → value), aligned with runs.
  """
  index: int
  config: ml_collections.ConfigDict
  runs: list[int]
  settings: list[dict[str, Any]]


def parse_axis(cfg: ml_collections.ConfigDict, text: str) -> list[dict[str, Any]]:
  """Parses one grid axis into its list of {field: value} points."""
  lhs, sep, rhs = text.partition("=")
  if not sep or not rhs.strip():
    raise ConfigError("--grid", f"expected FIELD=V1,V2,... got {text!r}")
  fields = [f.strip() for f in lhs.split("+")]
  for f in fields:
    if f == "grid":
      raise ConfigError("--grid", "cannot grid over 'grid'")
    config_lib.get_field(cfg, f)  # unknown field → ConfigError naming it
  points = []
  for item in _split_values(rhs):
    parts = item.split("/") if len(fields) > 1 else [item]
    if len(parts) != len(fields):
      raise ConfigError(lhs.strip(), f"zipped value {item!r} needs {len(fields)} parts")
    point = {}
    for f, p in zip(fields, parts):
      point[f] = config_lib.parse_value(f, p, config_lib.field_type(cfg, f))
    points.append(point)
  if not points:
    raise ConfigError(lhs.strip(), "grid axis has no values")
  return points


def _split_values(text: str) -> list[str]:
  """Splits on commas outside brackets."""
  out, depth, cur = [], 0, ""
  for ch in text:
    if ch in "([":
      depth += 1
    elif ch in ")]":
      depth -= 1
    if ch == "," and depth == 0:
      out.append(cur.strip())
      cur = ""
    else:
      cur += ch
  if cur.strip():
    out.append(cur.strip())
  return out


def expand(cfg: ml_collections.ConfigDict, axes: list[str] | None = None) -> list[ml_collections.ConfigDict]:
  """All run configs of a grid, in product order (first axis slowest).

  Args:
    cfg: the base config (with `cfg.grid` as the study's own axes).
    axes: grid axes from the command line; when given they replace `cfg.grid`.

  Returns:
    One validated config per run.
  """
  specs = list(axes) if axes else list(cfg.grid)
  parsed = [parse_axis(cfg, a) for a in specs]
  seen: dict[str, str] = {}
  for spec, points in zip(specs, parsed):
    for f in points[0]:
      if f in seen:
        raise ConfigError(f, f"appears in two grid axes ({seen[f]!r} and {spec!r})")
      seen[f] = spec
  runs = []
  for combo in itertools.product(*parsed) if parsed else [()]:
    run = copy.deepcopy(cfg)
    for point in combo:
      for f, v in point.items():
        config_lib.set_field(run, f, v)
    config_lib.validate(run)
    runs.append(run)
  return runs


def grid_fields(cfg: ml_collections.ConfigDict, axes: list[str] | None = None) -> list[str]:
  """The fields the grid varies, in axis order."""
  specs = list(axes) if axes else list(cfg.grid)
  out = []
  for a in specs:
    out.extend(f.strip() for f in a.partition("=")[0].split("+"))
  return out


def run_settings(run: ml_collections.ConfigDict, extra_fields: list[str]) -> dict[str, Any]:
  """The flat per-run settings of one run (per-run fields and grid fields)."""
  per_run = per_run_fields(run)
  fields = list(per_run) + [f for f in extra_fields if f not in per_run]
  return {f: config_lib.get_field(run, f) for f in fields}


def _static_key(run: ml_collections.ConfigDict) -> str:
  d = run.to_dict()
  for f in per_run_fields(run):
    *parents, leaf = f.split(".")
    node = d
    for p in parents:
      node = node[p]
    node.pop(leaf, None)
  d.pop("grid", None)
  return json.dumps(d, sort_keys=True, default=str)


def make_groups(runs: list[ml_collections.ConfigDict], fields: list[str]) -> list[Group]:
  """Splits runs into compile groups by their static (shape-level) config."""
  order: dict[str, Group] = {}
  for i, run in enumerate(runs):
    key = _static_key(run)
    if key not in order:
      order[key] = Group(index=len(order), config=copy.deepcopy(run), runs=[], settings=[])
    g = order[key]
    g.runs.append(i)
    g.settings.append(run_settings(run, fields))
  for g in order.values():
    for field in config_lib.task_of(g.config).capacity_fields:
      config_lib.set_field(g.config, field, max(s[field] for s in g.settings))
  return list(order.values())
