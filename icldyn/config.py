"""Configuration: the base config, loading `experiments/<study>.py[:arg]`, overrides, validation.

One config language (ml_collections). A study file defines `get_config(arg)`
returning a `ConfigDict` built on `base_config()`; the command line applies
`--config.FIELD=VALUE` overrides and `--grid FIELD=V1,V2` axes on top.

The base config holds the fields every run has (seeds, model, train, eval,
checkpoint, clamps, grid), `task.name`, and one group of fields per
registered task (`data.*` for the few-shot task, `tokens.*` for the token
task; `icldyn.tasks`). Only the selected task's group is read and checked.

Every problem with a config is raised as `ConfigError(field, message)` before
anything is written, and the CLI turns it into one line and exit code 2.
Clamp fields are checked against the model in `icldyn.build`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from icldyn import tasks
from icldyn.errors import ConfigError, did_you_mean

POS_EMBEDDINGS = ("rope", "sinusoidal", "learned")
OPTIMIZERS = ("adam", "adamw", "sgd")
MATMUL_PRECISIONS = ("float32", "tf32", "bf16")  # icldyn.step.PRECISIONS


def base_config() -> ml_collections.ConfigDict:
  """The paper's main run (Singh et al. 2024, arXiv 2404.07129, Sec. 2).

  Returns:
    A `ConfigDict` with every field icldyn reads. Study files start from it.
  """
  c = ml_collections.ConfigDict()

  c.seeds = ml_collections.ConfigDict()
  c.seeds.init = 0  # parameter initialisation
  c.seeds.data = 0  # training sequences and the label-pair split
  c.seeds.eval = 0  # the fixed evaluation sequences

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 2
  c.model.num_heads = 8
  c.model.d_model = 64
  c.model.pos_embedding = "rope"
  c.model.rope_base = 10000.0
  c.model.layer_norm = True
  c.model.mlp_ratio = config_dict.placeholder(float)  # None = attention only

  c.task = ml_collections.ConfigDict()
  c.task.name = "fewshot"  # which task (icldyn.tasks.TASKS); its fields are its group below
  for task in tasks.TASKS.values():
    c[task.group] = task.fields()

  c.train = ml_collections.ConfigDict()
  c.train.num_sequences = 1_000_000
  c.train.batch_size = 32
  c.train.learning_rate = 1e-5
  c.train.optimizer = "adam"
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.eval_every = 5000  # sequences
  c.train.scan_steps = 0  # steps per compiled chunk; 0 = choose from the event spacing
  # Matrix products of training and evaluation: float32 (full, every backend),
  # tf32 (NVIDIA GPUs; TPU: 3 bf16 passes), bf16 (bf16 inputs, f32 sums). README: Determinism.
  c.train.matmul_precision = "float32"

  c.eval = ml_collections.ConfigDict()
  c.eval.evaluators = ""  # comma-separated; '' = the task's default evaluators
  c.eval.size = 1000  # sequences per evaluator
  c.eval.batch = 250  # sequences per evaluation micro-batch (memory; results agree to float rounding)
  c.eval.clamps = ""  # comma-separated named clamps to evaluate under: keep_head_3,ablate_layer_0 (icldyn.clamps.named_plan)
  c.eval.clamp_evaluators = ""  # evaluators also run under eval.clamps; '' = the task's headline evaluator

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 50_000  # sequences; 0 = off
  c.checkpoint.steps = ""  # comma-separated explicit sequence counts
  c.checkpoint.log_num = 0  # this many log-spaced points over training
  c.checkpoint.resume_every = 100_000  # sequences between resume checkpoints

  c.clamp = ml_collections.ConfigDict()
  c.clamp.keep_head = -1  # >= 0: ablate (the values of) every last-layer head but this one
  c.clamp.condition = "none"  # sub-circuit condition (icldyn.clamps.CONDITIONS, docs/clamps.md)
  c.clamp.strength = 1.0  # strength s of the prev_token and match conditions
  c.clamps = ""  # training clamps, e.g. "ablate(layer=1, heads=[0, 2]) + prev_token(layer=0)" (docs/clamps.md)

  c.grid = ()  # tuple of 'FIELD=V1,V2' (product) or 'F1+F2=A1/B1,A2/B2' (zip) strings
  c.lock()
  return c


# --------------------------------------------------------------------------
# Loading and overriding.


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/study.py[:arg]` by calling its `get_config(arg)`.

  Args:
    spec: file path, optionally followed by `:arg`.

  Returns:
    The study's config (locked: unknown fields are errors).
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError("--config", f"no such study file {path!r}")
  module_spec = importlib.util.spec_from_file_location(
      "icldyn_study_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a broken study file is a config error, not a crash
    raise ConfigError("--config", f"cannot import {path}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError("--config", f"{path} defines no get_config(arg)")
  try:
    cfg = module.get_config(arg)
  except ConfigError:
    raise
  except Exception as e:
    raise ConfigError("--config", f"{spec}: {e}") from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError("--config", f"{path}: get_config must return an ml_collections.ConfigDict, "
                      f"got {type(cfg).__name__}")
  cfg.lock()
  return cfg


def get_field(cfg: ml_collections.ConfigDict, field: str) -> Any:
  """Returns the value at a dotted field, or raises ConfigError if unknown
  (with the closest existing field as a suggestion)."""
  node = cfg
  prefix = ""
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      hint = suggest_field(node, part, prefix) if isinstance(node, ml_collections.ConfigDict) else ""
      raise ConfigError(field, "unknown config field" + hint)
    node = node[part]
    prefix += part + "."
  return node


def all_fields(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every dotted leaf field of a config."""
  out = []
  for key in cfg.keys():
    if isinstance(cfg[key], ml_collections.ConfigDict):
      out += all_fields(cfg[key], f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


def suggest_field(node: ml_collections.ConfigDict, part: str, prefix: str) -> str:
  """'; did you mean FIELD?' for a misspelt field `prefix + part` inside `node`."""
  close = did_you_mean(part, list(node.keys()))  # compare names, not the shared prefix
  return close.replace("mean ", f"mean {prefix}", 1) if close else ""


def field_type(cfg: ml_collections.ConfigDict, field: str) -> type | None:
  """The declared type of a dotted field (None when it is untyped)."""
  *parents, leaf = field.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  get_ref = getattr(node, "get_ref", None)
  if get_ref is not None:
    try:
      ref = node.get_ref(leaf)
      return ref.get_type()
    except Exception:  # not a FieldReference: fall back to the value's type
      pass
  value = node[leaf]
  return None if value is None else type(value)


def parse_value(field: str, text: str, typ: type | None) -> Any:
  """Parses command-line text for a field of type `typ`."""
  text = text.strip()
  if text.lower() in ("none", "null") and typ is not str:
    return None
  try:
    if typ is bool:
      low = text.lower()
      if low in ("true", "1", "yes"):
        return True
      if low in ("false", "0", "no"):
        return False
      raise ValueError(text)
    if typ is int:
      value = ast.literal_eval(text)
      if isinstance(value, float) and value.is_integer():
        value = int(value)
      if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(text)
      return value
    if typ is float:
      value = float(text)
      return value
    if typ is str:
      return text
    if typ in (tuple, list):
      value = ast.literal_eval(text)
      return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    name = getattr(typ, "__name__", "a literal")
    raise ConfigError(field, f"expected {name}, got {text!r}") from e


def set_field(cfg: ml_collections.ConfigDict, field: str, value: Any) -> None:
  """Sets a dotted field, type-checked against its declared type."""
  get_field(cfg, field)
  typ = field_type(cfg, field)
  if isinstance(value, str) and typ is not str:
    value = parse_value(field, value, typ)
  if typ is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if typ is int and isinstance(value, float) and value.is_integer():
    value = int(value)
  *parents, leaf = field.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  try:
    with cfg.unlocked():
      node[leaf] = value
  except TypeError as e:
    raise ConfigError(field, f"wrong type: {e}") from e


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Applies `FIELD=VALUE` overrides (the text after `--config.`)."""
  for item in overrides:
    field, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(field, "override needs the form --config.FIELD=VALUE")
    set_field(cfg, field.strip(), text)


def to_json(cfg: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (tuples become lists)."""
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(resolved: dict) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The config and grid axes of a workdir's config.json, rebuilt on `base_config()`.

  Every field is set through `set_field`, so types match what training
  used; fields the stored config lacks (a workdir written before they
  existed) keep their defaults. A field the base config lacks (a study that
  added one) falls back to a plain ConfigDict of the stored values.

  Returns:
    (config, grid axes).
  """
  stored = resolved["config"]
  cfg = base_config()
  try:
    for field, value in _leaves(stored):
      if field == "grid":
        value = tuple(value)
      set_field(cfg, field, value)
  except ConfigError:
    cfg = ml_collections.ConfigDict(stored)
  return cfg, list(resolved.get("grid") or [])


def _leaves(d: dict, prefix: str = ""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


# --------------------------------------------------------------------------
# Validation.


def _require(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(field, message)


def task_of(cfg: ml_collections.ConfigDict) -> tasks.Task:
  """The task a config selects (ConfigError naming `task.name` if unknown)."""
  return tasks.get(cfg.task.name)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks one resolved run config; raises ConfigError naming the field.

  Clamp fields (`clamps`, `clamp.*`, `eval.clamps`) need the model and are
  checked by `icldyn.build`.
  """
  task = task_of(cfg)
  m, t, ev, ck = cfg.model, cfg.train, cfg.eval, cfg.checkpoint
  for field in ("seeds.init", "seeds.data", "seeds.eval"):
    v = get_field(cfg, field)
    _require(isinstance(v, int) and 0 <= v < 2**31, field,
             f"must be an integer in [0, 2^31), got {v!r}")
  _require(m.num_layers >= 1, "model.num_layers", "must be >= 1")
  _require(m.num_heads >= 1, "model.num_heads", "must be >= 1")
  _require(m.d_model >= 1 and m.d_model % m.num_heads == 0, "model.d_model",
           f"must be a positive multiple of model.num_heads ({m.num_heads})")
  _require(m.pos_embedding in POS_EMBEDDINGS, "model.pos_embedding",
           f"must be one of {POS_EMBEDDINGS}, got {m.pos_embedding!r}")
  if m.pos_embedding == "rope":
    _require((m.d_model // m.num_heads) % 2 == 0, "model.d_model",
             "RoPE needs an even head dimension (d_model / num_heads)")
  _require(m.mlp_ratio is None or m.mlp_ratio > 0, "model.mlp_ratio",
           "must be None (attention only) or > 0")

  task.validate(cfg)

  _require(t.num_sequences >= t.batch_size, "train.num_sequences",
           "must be at least one batch")
  _require(t.batch_size >= 1, "train.batch_size", "must be >= 1")
  _require(_finite(t.learning_rate) and t.learning_rate >= 0, "train.learning_rate",
           "must be a finite number >= 0")
  _require(t.optimizer in OPTIMIZERS, "train.optimizer",
           f"must be one of {OPTIMIZERS}, got {t.optimizer!r}")
  _require(_finite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay",
           "must be a finite number >= 0")
  _require(t.eval_every >= 1, "train.eval_every", "must be >= 1 sequence")
  _require(t.scan_steps >= 0, "train.scan_steps", "must be >= 0")
  _require(t.matmul_precision in MATMUL_PRECISIONS, "train.matmul_precision",
           f"must be one of {', '.join(MATMUL_PRECISIONS)}, got {t.matmul_precision!r}"
           f"{did_you_mean(t.matmul_precision, MATMUL_PRECISIONS)}")

  names = eval_names(cfg)
  for name in names:
    _require(name in task.evaluators, "eval.evaluators",
             f"unknown evaluator {name!r} of task {task.name}"
             f"{did_you_mean(name, task.evaluators)} (known: {', '.join(task.evaluators)})")
  task.validate_evaluators(cfg, names)
  for name in _names(ev.clamp_evaluators):
    _require(name in names, "eval.clamp_evaluators",
             f"{name!r} is not among the evaluators ({', '.join(names)})")
  _require(ev.size >= 1, "eval.size", "must be >= 1")
  _require(ev.batch >= 1, "eval.batch", "must be >= 1")

  _require(ck.every >= 0, "checkpoint.every", "must be >= 0")
  _require(ck.log_num >= 0, "checkpoint.log_num", "must be >= 0")
  _require(ck.resume_every >= 0, "checkpoint.resume_every", "must be >= 0")
  checkpoint_sequences(cfg)  # parses checkpoint.steps


def _finite(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _names(text: str) -> list[str]:
  return [n.strip() for n in str(text).split(",") if n.strip()]


def eval_names(cfg: ml_collections.ConfigDict) -> list[str]:
  """The evaluator names of a config, in order (`''`: the task's defaults)."""
  return _names(cfg.eval.evaluators) or list(task_of(cfg).default_evaluators)


def clamp_evaluators(cfg: ml_collections.ConfigDict) -> list[str]:
  """Evaluators also run under `eval.clamps` (`''`: the task's headline
  evaluator, if the config evaluates it)."""
  names = _names(cfg.eval.clamp_evaluators)
  if names:
    return names
  headline = task_of(cfg).headline.split("/")[0]
  return [headline] if headline in eval_names(cfg) else []


def checkpoint_sequences(cfg: ml_collections.ConfigDict) -> list[int]:
  """Explicit checkpoint sequence counts from `checkpoint.steps`."""
  out = []
  for item in str(cfg.checkpoint.steps).split(","):
    item = item.strip()
    if not item:
      continue
    try:
      value = int(float(item))
    except ValueError as e:
      raise ConfigError("checkpoint.steps", f"not a number: {item!r}") from e
    if value < 0:
      raise ConfigError("checkpoint.steps", f"negative: {value}")
    out.append(value)
  return out
