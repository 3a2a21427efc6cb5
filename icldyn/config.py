"""Configuration: the base config, loading `experiments/<study>.py[:arg]`, overrides, validation.

One config language (ml_collections). A study file defines `get_config(arg)`
returning a `ConfigDict` built on `base_config()`; the command line applies
`--config.FIELD=VALUE` overrides and `--grid FIELD=V1,V2` axes on top.

Every problem with a config is raised as `ConfigError(field, message)` before
anything is written, and the CLI turns it into one line and exit code 2.
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

LABEL_PAIR_FORMATS = ("distractor",)
REST_MODES = ("distractor", "iid", "unique")
POS_EMBEDDINGS = ("rope", "sinusoidal", "learned")
OPTIMIZERS = ("adam", "adamw", "sgd")
DATA_SOURCES = ("gaussian", "file")
EVALUATORS = ("fsl_train", "fsl_val_rl", "fsl_train_valex", "fsl_test_class")


class ConfigError(ValueError):
  """A bad configuration value; `field` names the dotted config field."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field
    self.message = message


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

  c.data = ml_collections.ConfigDict()
  c.data.source = "gaussian"
  c.data.path = ""  # data.source == 'file': .h5, .npy or .npz of [classes, exemplars, dim]
  c.data.dataset_key = "resnet18/224/feat"  # key inside an .h5 / .npz file
  c.data.dim = 512  # gaussian source: input dimension D
  c.data.exemplar_noise = 0.1  # gaussian source: exemplar = mean + eps * N(0, I/D)
  c.data.table_seed = 0  # gaussian source: seed of the class table (shared by all runs)
  c.data.num_train_classes = 50
  c.data.num_test_classes = 100
  c.data.num_train_exemplars = 1  # exemplars per class used in training ...
  c.data.num_exemplars = 5  # ... of this many; the rest are held out (fsl_train_valex)
  c.data.num_labels = 5
  c.data.context_len = 2  # exemplar-label pairs before the query
  c.data.burstiness = 1  # copies of the query's class in the context
  c.data.rest = "distractor"  # other context slots: one distractor class | iid | unique classes
  c.data.zipf_alpha = 0.0  # class frequencies p(k) ~ (k+1)^-alpha over training classes
  c.data.noise = 0.0  # per-token Gaussian input noise, std noise/sqrt(D) per coordinate
  c.data.relabel = True  # per-sequence relabelling (few-shot); False: label = class mod num_labels
  c.data.label_holdout = 0.2  # share of label pairs held out for fsl_val_rl (paper: 2 of 10)

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

  c.eval = ml_collections.ConfigDict()
  c.eval.evaluators = ",".join(EVALUATORS)
  c.eval.size = 1000  # sequences per evaluator
  c.eval.batch = 250  # sequences per evaluation micro-batch (memory; results agree to float rounding)
  c.eval.clamps = ""  # comma-separated named clamps to evaluate under: keep_head_3,ablate_layer_0 (icldyn.clamps.named_plan)
  c.eval.clamp_evaluators = "fsl_train"  # evaluators that are also run under eval.clamps

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
  """Returns the value at a dotted field, or raises ConfigError if unknown."""
  node = cfg
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(field, "unknown config field")
    node = node[part]
  return node


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


# --------------------------------------------------------------------------
# Validation.


def _require(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(field, message)


def distinct_classes_per_sequence(cfg: ml_collections.ConfigDict) -> int:
  """How many different classes one sequence can hold (query included)."""
  rest_slots = cfg.data.context_len - cfg.data.burstiness
  if rest_slots <= 0:
    return 1
  if cfg.data.rest == "distractor":
    return 2
  return 1 + rest_slots


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks one resolved run config; raises ConfigError naming the field."""
  m, d, t, ev, ck = cfg.model, cfg.data, cfg.train, cfg.eval, cfg.checkpoint
  for field in ("seeds.init", "seeds.data", "seeds.eval", "data.table_seed"):
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

  _require(d.source in DATA_SOURCES, "data.source",
           f"must be one of {DATA_SOURCES}, got {d.source!r}")
  if d.source == "file":
    _require(bool(d.path), "data.path", "data.source=file needs a path")
    _require(os.path.isfile(d.path), "data.path", f"no such file {d.path!r}")
  _require(d.dim >= 1, "data.dim", "must be >= 1")
  _require(_finite(d.exemplar_noise) and d.exemplar_noise >= 0,
           "data.exemplar_noise", "must be a finite number >= 0")
  _require(d.context_len >= 1, "data.context_len", "must be >= 1")
  _require(0 <= d.burstiness <= d.context_len, "data.burstiness",
           f"must be in [0, data.context_len={d.context_len}], got {d.burstiness}")
  _require(d.rest in REST_MODES, "data.rest",
           f"must be one of {REST_MODES}, got {d.rest!r}")
  _require(d.num_train_classes >= 1, "data.num_train_classes", "must be >= 1")
  _require(d.num_test_classes >= 0, "data.num_test_classes", "must be >= 0")
  _require(1 <= d.num_train_exemplars <= d.num_exemplars, "data.num_train_exemplars",
           f"must be in [1, data.num_exemplars={d.num_exemplars}]")
  _require(d.num_labels >= 2, "data.num_labels", "must be >= 2")
  _require(d.num_labels <= d.num_train_classes, "data.num_labels",
           f"more labels ({d.num_labels}) than training classes "
           f"({d.num_train_classes})")
  k = distinct_classes_per_sequence(cfg)
  _require(k <= d.num_train_classes, "data.num_train_classes",
           f"a sequence holds {k} distinct classes but only "
           f"{d.num_train_classes} training classes exist")
  if d.relabel:
    _require(k <= d.num_labels, "data.num_labels",
             f"a sequence holds {k} distinct classes, so it needs >= {k} labels")
  _require(_finite(d.zipf_alpha) and d.zipf_alpha >= 0, "data.zipf_alpha",
           "must be a finite number >= 0")
  _require(_finite(d.noise) and d.noise >= 0, "data.noise", "must be a finite number >= 0")
  _require(_finite(d.label_holdout) and 0 <= d.label_holdout < 1, "data.label_holdout",
           "must be in [0, 1)")
  if d.label_holdout > 0:
    _require(d.relabel and k == 2, "data.label_holdout",
             "label-pair hold-out needs relabelled sequences of two classes "
             "(data.rest='distractor', data.burstiness < data.context_len); set it to 0")
    pairs = d.num_labels * (d.num_labels - 1) // 2
    held = int(round(d.label_holdout * pairs))
    _require(1 <= held < pairs, "data.label_holdout",
             f"holds out {held} of {pairs} label pairs; need at least one on each side")

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

  names = eval_names(cfg)
  for name in names:
    _require(name in EVALUATORS, "eval.evaluators",
             f"unknown evaluator {name!r}; known: {', '.join(EVALUATORS)}")
  if "fsl_test_class" in names:
    _require(d.num_test_classes >= k, "data.num_test_classes",
             f"fsl_test_class needs >= {k} test classes")
  if "fsl_val_rl" in names:
    _require(d.label_holdout > 0, "eval.evaluators",
             "fsl_val_rl needs data.label_holdout > 0")
  if "fsl_train_valex" in names:
    _require(d.num_exemplars > d.num_train_exemplars, "eval.evaluators",
             "fsl_train_valex needs held-out exemplars (data.num_exemplars > "
             "data.num_train_exemplars)")
  _require(ev.size >= 1, "eval.size", "must be >= 1")
  _require(ev.batch >= 1, "eval.batch", "must be >= 1")

  _require(ck.every >= 0, "checkpoint.every", "must be >= 0")
  _require(ck.log_num >= 0, "checkpoint.log_num", "must be >= 0")
  _require(ck.resume_every >= 0, "checkpoint.resume_every", "must be >= 0")
  checkpoint_sequences(cfg)  # parses checkpoint.steps

  from icldyn import clamps as clamps_lib  # local import: icldyn.clamps imports this module
  clamps_lib.validate(cfg)  # clamps, clamp.*, eval.clamps


def _finite(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def eval_names(cfg: ml_collections.ConfigDict) -> list[str]:
  """The evaluator names of a config, in order."""
  return [n.strip() for n in cfg.eval.evaluators.split(",") if n.strip()]


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
