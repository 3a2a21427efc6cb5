"""The clamp catalogue: typed constructors, each beside the traced half that applies it.

On top of the model's clamp mechanism (`icldyn.model.clamp`: a value and a
mask at a node of the activation tree) this module owns the catalogue of
interventions of Singh et al. 2024 (arXiv 2404.07129, "artificial
optogenetics") as typed constructors: `AblateHeads`, `PrevTokenPattern`,
`InductionPattern`, `DisallowPrevToken`, `MatchPattern`, `HeadTemperature`,
`SilenceNonLabel`, `CopyFromHead`, `Preserve`, `Layer1Clamp`, `GraftIn`,
`GraftOut`.

Each constructor (a frozen, keyword-only dataclass) is followed by its
*slot*: the static site it needs in a plan (`icldyn.clamps.plan`) and what
it computes there, from per-run arrays the constructor fills (`fill`). A
constructor's `resolve` checks it against a model (negative layers count
from the end, `heads=None` means all heads) and the model's task; `claims`
says which entries it owns, for conflicts.

Clamps defined by a reference attention pattern (`prev_token`, `induction`,
`match`, `copy`, `layer1`, `silence_non_label`, `disallow_prev_token`) read
it from the task: its `Layout` (static positions) and the `Targets` of each
batch (`icldyn.tasks.base`), so they work for every task that provides
them, and a task that cannot gets one line naming the clamp and the task.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from icldyn import model as model_lib
from icldyn.model import Clamp, merge
from icldyn.tasks.base import Layout


# --------------------------------------------------------------------------
# Claims: which entries of a model a clamp owns.

def empty_claims(spec) -> dict[str, np.ndarray]:
  """Claim arrays: attention [L, H, T, T], value/temperature [L, H], resid [L], logits [1]."""
  l, h, t = spec.num_layers, spec.num_heads, spec.seq_len
  return {"attention": np.zeros((l, h, t, t), bool), "value": np.zeros((l, h), bool),
          "temperature": np.zeros((l, h), bool), "resid": np.zeros((l,), bool),
          "logits": np.zeros((1,), bool)}


def layout_of(spec) -> Layout:
  """The task layout of a model (its front end's)."""
  return spec.front.layout


def _rows(positions, t: int) -> np.ndarray:
  """[T] bool with True at `positions`."""
  out = np.zeros(t, bool)
  out[list(positions)] = True
  return out


def _label_rows(spec) -> np.ndarray:
  """[T] bool: the label tokens of the model's task."""
  return _rows(layout_of(spec).label_positions, spec.seq_len)


def _label_rows_or_none(spec) -> np.ndarray:
  """[T] bool: the label tokens, or none for a task without them (`only_labels`
  is refused there, so the rows are never used)."""
  lay = layout_of(spec)
  return _rows(lay.label_positions or (), spec.seq_len)


def _induction_row_claims(spec, layer: int, heads) -> dict[str, np.ndarray]:
  """Claims of a clamp that writes the heads' attention at every possible induction row."""
  c = empty_claims(spec)
  c["attention"][layer][np.ix_(list(heads), list(layout_of(spec).induction_rows))] = True
  return c


def _needs(spec, what: str, clamp: str) -> None:
  """Refuses a clamp whose task's layout lacks `what` (one line naming both)."""
  lay = layout_of(spec)
  if getattr(lay, what) is None:
    reason = {"label_positions": "has no label tokens",
              "layer1_source": "defines no perfect previous-token first layer"}[what]
    raise ValueError(f"the {lay.task} task {reason}, so {clamp} cannot apply to it")


# --------------------------------------------------------------------------
# Normalising constructor arguments.


def _int(name, v):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
    raise ValueError(f"{name} must be an integer, got {v!r}")
  return int(v)

def _ints(name, v):
  if v is None:
    return None
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    v = [v]
  if isinstance(v, str) or not isinstance(v, (list, tuple)):
    raise ValueError(f"{name} must be a list of integers (e.g. [0, 2]), got {v!r}")
  return tuple(sorted({_int(name, x) for x in v}))

def _float(name, v):
  if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
    raise ValueError(f"{name} must be a number, got {v!r}")
  if not math.isfinite(v):
    raise ValueError(f"{name} must be finite, got {v!r}")
  return float(v)

def _unit(name, v):
  v = _float(name, v)
  if not 0.0 <= v <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {v!r}")
  return v

def _bool(name, v):
  if not isinstance(v, (bool, np.bool_)):
    raise ValueError(f"{name} must be true or false, got {v!r}")
  return bool(v)

def _strs(name, v):
  if isinstance(v, str):
    v = [v]
  if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
    raise ValueError(f"{name} must be a list of names, got {v!r}")
  return tuple(dict.fromkeys(v))

def _str(name, v):
  if not isinstance(v, str) or not v:
    raise ValueError(f"{name} must be a name, got {v!r}")
  return v

def _str_or_none(name, v):
  if v is not None and not isinstance(v, str):
    raise ValueError(f"{name} must be a string, got {v!r}")
  return v

_NORMALISE = {"layer": _int, "head": _int, "run": _int, "step": _int, "heads": _ints,
              "layers": _ints, "strength": _unit, "temperature": _float,
              "only_labels": _bool, "site": _str, "what": _strs, "workdir": _str_or_none}



# --------------------------------------------------------------------------
# Slots: the static sites of a plan and what they compute in the graph.
#
# Each slot has a key in the per-run params dict, `empty` arrays for a run
# that does not use it, and either a clamp-tree fragment (`tree`) applied in
# the main pass or a post-processing of its outputs (`post`). `ctx` is the
# plan's `Context` (the run's params, batch, targets and extra passes).

STAGE_GRAFT_IN, STAGE_PRESERVE, STAGE_ENTRY, STAGE_POST = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Slot:
  """A static clamp site of a plan (hashable; part of the compiled program)."""
  STAGE: ClassVar[int] = STAGE_ENTRY

  @property
  def key(self) -> str:
    raise NotImplementedError

  def empty(self, spec) -> dict:
    raise NotImplementedError

  def tree(self, ctx, p: dict) -> dict:
    return {}

  def post(self, ctx, p: dict, logits, acts):
    return logits, acts



def _heads_empty(spec, **values) -> dict:
  h = spec.num_heads
  out = {"heads": np.zeros((h,), bool)}
  for k, (v, dtype) in values.items():
    out[k] = np.full((h,), v, dtype)
  return out

def _attn(layer: int, **sites) -> dict:
  return {f"layer_{layer}": {"attn": sites}}

def _head_mask(heads) -> jax.Array:
  """[H] → [1, H, 1, 1] (pattern/scores layout)."""
  return jnp.asarray(heads)[None, :, None, None]



def _rows_mask(heads, rows: jax.Array) -> jax.Array:
  """[H] heads and [B, T] rows → a [B, H, T, 1] mask of pattern/score rows."""
  return jnp.asarray(heads)[None, :, None, None] & rows[:, None, :, None]




# --------------------------------------------------------------------------
# The constructors, each followed by its slot.



@dataclasses.dataclass(frozen=True, kw_only=True)
class ClampSpec:
  """Base of the typed clamp constructors (the table in docs/clamps.md)."""
  NAME: ClassVar[str] = ""

  def __post_init__(self):
    for f in dataclasses.fields(self):
      norm = _NORMALISE.get(f.name)
      if norm is not None:
        object.__setattr__(self, f.name, norm(f.name, getattr(self, f.name)))

  # -- checks against a model -------------------------------------------------

  def resolve(self, spec, load_donor: Callable | None = None) -> "ClampSpec":
    """This clamp with layers and heads made explicit for `spec` (ValueError if invalid).

    `load_donor(workdir, run, step) -> (ModelSpec, params)` loads a graft
    donor's checkpoint; without it, donors are only checked to exist.
    """
    out = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name == "layer":
        out[f.name] = _layer(v, spec)
      elif f.name == "heads":
        out[f.name] = _heads(v, spec)
      elif f.name == "head":
        if not 0 <= v < spec.num_heads:
          raise ValueError(f"head {v} out of range (model.num_heads={spec.num_heads})")
    return dataclasses.replace(self, **out)

  def claims(self, spec) -> dict[str, np.ndarray]:
    """The entries this clamp owns (a resolved clamp)."""
    return empty_claims(spec)

  def slots(self) -> tuple[Slot, ...]:
    raise NotImplementedError

  def fill(self, p: dict, spec, claimed: dict[str, np.ndarray]) -> None:
    """Writes this clamp's per-run arrays into `p` (slot key → arrays)."""
    raise NotImplementedError

  def render(self) -> str:
    """The config form, e.g. `ablate(layer=1, heads=[0, 2])`."""
    args = []
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not f.repr or (f.default is not dataclasses.MISSING and v == f.default):
        continue
      args.append(f"{f.name}={render_value(v)}")
    return f"{self.NAME}({', '.join(args)})"

def render_value(v) -> str:
  """A clamp argument in the config form (`[a, b]`, `true`, bare names unquoted)."""
  if isinstance(v, tuple):
    return "[" + ", ".join(render_value(x) for x in v) + "]"
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, str):
    return repr(v) if not re.fullmatch(r"[A-Za-z_]\w*", v) else v
  return repr(v)

def _layer(layer: int, spec) -> int:
  l = layer + spec.num_layers if layer < 0 else layer
  if not 0 <= l < spec.num_layers:
    raise ValueError(f"layer {layer} out of range (model.num_layers={spec.num_layers})")
  return l

def _heads(heads, spec) -> tuple[int, ...]:
  if heads is None:
    return tuple(range(spec.num_heads))
  if not heads:
    raise ValueError("no heads given")
  bad = [h for h in heads if not 0 <= h < spec.num_heads]
  if bad:
    raise ValueError(f"head {bad[0]} out of range (model.num_heads={spec.num_heads})")
  return heads

def _set_heads(p: dict, heads, **values) -> None:
  idx = list(heads)
  p["heads"][idx] = True
  for k, v in values.items():
    p[k][idx] = v


@dataclasses.dataclass(frozen=True, kw_only=True)
class AblateHeads(ClampSpec):
  """Zeroes the values (site 'v', the paper's choice) or the outputs z (site 'z')
  of heads in a layer, so they add nothing to the residual stream.

  Attributes:
    layer: the layer (negative counts from the end).
    heads: the heads; None = every head of the layer.
    site: 'v' or 'z' (identical outputs; 'z' leaves the values intact).
  """
  NAME: ClassVar[str] = "ablate"
  layer: int
  heads: tuple[int, ...] | None = None
  site: str = "v"

  def resolve(self, spec, load_donor=None):
    if self.site not in ("v", "z"):
      raise ValueError(f"site must be 'v' or 'z', got {self.site!r}")
    return super().resolve(spec, load_donor)

  def claims(self, spec):
    c = empty_claims(spec)
    c["value"][self.layer, list(self.heads)] = True
    return c

  def slots(self):
    return (_AblateSlot(layer=self.layer, site=self.site),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads)


@dataclasses.dataclass(frozen=True)
class _AblateSlot(Slot):
  layer: int
  site: str

  @property
  def key(self):
    return f"ablate/{self.site}/{self.layer}"

  def empty(self, spec):
    return _heads_empty(spec)

  def tree(self, ctx, p):
    mask = jnp.asarray(p["heads"])[None, None, :, None]  # [B, T, H, dh] layout
    return _attn(self.layer, **{self.site: Clamp(jnp.float32(0.0), mask)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrevTokenPattern(ClampSpec):
  """Fixes heads' attention to the previous token: a pattern with `strength` s on
  the previous token and 1 - s on the token itself (position 0 attends to
  itself), at every position or only at label positions.

  Attributes:
    layer, heads: the heads (heads=None: all heads of the layer).
    strength: s in [0, 1].
    only_labels: clamp only the rows of label tokens (odd positions).
  """
  NAME: ClassVar[str] = "prev_token"
  layer: int
  heads: tuple[int, ...] | None = None
  strength: float = 1.0
  only_labels: bool = False

  def resolve(self, spec, load_donor=None):
    if self.only_labels:
      _needs(spec, "label_positions", f"{self.NAME}(only_labels=true)")
    return super().resolve(spec, load_donor)

  def claims(self, spec):
    c = empty_claims(spec)
    rows = _label_rows(spec) if self.only_labels else np.ones(spec.seq_len, bool)
    c["attention"][self.layer, list(self.heads)] = rows[:, None]
    return c

  def slots(self):
    return (_PrevTokenSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads, strength=self.strength,
               only_labels=self.only_labels)


@dataclasses.dataclass(frozen=True)
class _PrevTokenSlot(Slot):
  layer: int

  @property
  def key(self):
    return f"prev_token/{self.layer}"

  def empty(self, spec):
    return _heads_empty(spec, strength=(1.0, np.float32), only_labels=(False, bool))

  def tree(self, ctx, p):
    t = ctx.spec.seq_len
    s = jnp.asarray(p["strength"], jnp.float32)[:, None, None]
    eye = np.eye(t, dtype=np.float32)
    eye[0, 0] = 0.0
    sub = np.eye(t, k=-1, dtype=np.float32)
    first = np.zeros((t, t), np.float32)
    first[0, 0] = 1.0
    value = (1.0 - s) * eye + s * sub + first  # [H, T, T]; row 0 attends to itself
    rows = jnp.where(jnp.asarray(p["only_labels"])[:, None], _label_rows_or_none(ctx.spec)[None, :],
                     True)
    mask = (jnp.asarray(p["heads"])[:, None] & rows)[None, :, :, None]  # [1, H, T, 1]
    return _attn(self.layer, pattern=Clamp(value[None], mask))


@dataclasses.dataclass(frozen=True, kw_only=True)
class InductionPattern(ClampSpec):
  """Fixes heads' attention at the task's induction rows to the perfect induction pattern.

  Few-shot: the query attends with total weight s to the label tokens that
  follow an exemplar of the query's class and spreads 1 - s evenly over the
  other label tokens; exemplar tokens get 0. With two pairs (one of the
  query's class) this is the paper's clamp, whose induction strength is
  2s - 1. If every context exemplar is of the query's class they share all
  the weight; if none is, the query attends uniformly to the label tokens.
  Works for any context length; only the query's row is clamped. In general
  (`Targets`): weight s on the row's induction targets, 1 - s over the rest
  of its support, uniform over the support when it has no target.

  Attributes:
    layer, heads: the heads (heads=None: all heads of the layer).
    strength: s in [0, 1].
  """
  NAME: ClassVar[str] = "induction"
  layer: int
  heads: tuple[int, ...] | None = None
  strength: float = 1.0

  def claims(self, spec):
    return _induction_row_claims(spec, self.layer, self.heads)

  def slots(self):
    return (_InductionSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads, strength=self.strength)


@dataclasses.dataclass(frozen=True)
class _InductionSlot(Slot):
  layer: int

  @property
  def key(self):
    return f"induction/{self.layer}"

  def empty(self, spec):
    return _heads_empty(spec, strength=(1.0, np.float32))

  def tree(self, ctx, p):
    tg = ctx.targets
    target, support = tg.induction[:, None], tg.support[:, None]  # [B, 1, T, T]
    other = support & ~target
    n_c = jnp.sum(target, -1, keepdims=True).astype(jnp.float32)
    n_o = jnp.sum(other, -1, keepdims=True).astype(jnp.float32)
    s = jnp.asarray(p["strength"], jnp.float32)[None, :, None, None]  # [1, H, 1, 1]
    w_c = jnp.where(n_o > 0, s, 1.0) / jnp.maximum(n_c, 1.0)
    w_o = (1.0 - s) / jnp.maximum(n_o, 1.0)
    w = jnp.where(target, w_c, jnp.where(other, w_o, 0.0))
    # No target in the row: uniform over the support.
    w = jnp.where(n_c > 0, w, jnp.where(support, 1.0 / jnp.maximum(n_c + n_o, 1.0), 0.0))
    return _attn(self.layer, pattern=Clamp(w, _rows_mask(p["heads"], tg.rows)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DisallowPrevToken(ClampSpec):
  """Forbids heads to attend to the previous token (its score is -inf), at every
  position or only at label positions; the rest of the row renormalises.

  Attributes:
    layer, heads: the heads (heads=None: all heads of the layer).
    only_labels: only at label tokens (odd positions).
  """
  NAME: ClassVar[str] = "disallow_prev_token"
  layer: int
  heads: tuple[int, ...] | None = None
  only_labels: bool = False

  def resolve(self, spec, load_donor=None):
    if self.only_labels:
      _needs(spec, "label_positions", f"{self.NAME}(only_labels=true)")
    return super().resolve(spec, load_donor)

  def claims(self, spec):
    c = empty_claims(spec)
    t = spec.seq_len
    rows = _label_rows(spec) if self.only_labels else np.arange(t) >= 1
    i = np.flatnonzero(rows)
    for h in self.heads:
      c["attention"][self.layer, h, i, i - 1] = True
    return c

  def slots(self):
    return (_DisallowSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads, only_labels=self.only_labels)


@dataclasses.dataclass(frozen=True)
class _DisallowSlot(Slot):
  layer: int

  @property
  def key(self):
    return f"disallow_prev_token/{self.layer}"

  def empty(self, spec):
    return _heads_empty(spec, only_labels=(False, bool))

  def tree(self, ctx, p):
    t = ctx.spec.seq_len
    i = np.arange(t)
    prev = i[:, None] - 1 == i[None, :]  # [T, T]
    rows = jnp.where(jnp.asarray(p["only_labels"])[:, None], _label_rows_or_none(ctx.spec)[None, :],
                     True)
    mask = jnp.asarray(p["heads"])[:, None, None] & rows[:, :, None] & prev[None]
    return _attn(self.layer, scores=Clamp(jnp.float32(-jnp.inf), mask[None]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatchPattern(ClampSpec):
  """Fixes heads' attention at the task's induction rows by similarity ("match heads").

  Few-shot: the query attends to the label token after each context exemplar
  with weight softmax_i(cos(x_i, x_q) / temperature) over the context
  exemplars (temperature 0: a hard max, ties shared); exemplar tokens get 0.
  This is W_K^T W_Q = I / temperature on the raw exemplars, ignoring
  positions. Works for any context length; only the query's row is clamped.
  In general: a softmax of the task's `match_sim` over the row's support.

  Attributes:
    layer, heads: the heads (heads=None: all heads of the layer).
    temperature: >= 0.
  """
  NAME: ClassVar[str] = "match"
  layer: int
  heads: tuple[int, ...] | None = None
  temperature: float = 0.0

  def resolve(self, spec, load_donor=None):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    return super().resolve(spec, load_donor)

  def claims(self, spec):
    return _induction_row_claims(spec, self.layer, self.heads)

  def slots(self):
    return (_MatchSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads, temperature=self.temperature)


@dataclasses.dataclass(frozen=True)
class _MatchSlot(Slot):
  layer: int

  @property
  def key(self):
    return f"match/{self.layer}"

  def empty(self, spec):
    return _heads_empty(spec, temperature=(0.0, np.float32))

  def tree(self, ctx, p):
    tg = ctx.targets
    support = tg.support  # [B, T, T]
    sims = jnp.where(support, tg.match_sim, -jnp.inf)
    hard = (sims == jnp.max(sims, -1, keepdims=True)) & support
    hard = hard / jnp.maximum(jnp.sum(hard, -1, keepdims=True), 1)
    tau = jnp.asarray(p["temperature"], jnp.float32)[None, :, None, None]  # [1, H, 1, 1]
    soft = jax.nn.softmax(sims[:, None] / jnp.where(tau > 0, tau, 1.0), axis=-1)
    soft = jnp.where(support[:, None], soft, 0.0)  # rows without support: no NaN
    w = jnp.where(tau > 0, soft, hard[:, None])
    return _attn(self.layer, pattern=Clamp(w, _rows_mask(p["heads"], tg.rows)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadTemperature(ClampSpec):
  """Divides heads' attention scores by a temperature (at every position).

  Not an assignment but a clamp of the per-head temperature site (1 unless
  clamped), so the head still learns through its scores.

  Attributes:
    layer, heads: the heads (heads=None: all heads of the layer).
    temperature: > 0 (below 1 sharpens, above 1 flattens).
  """
  NAME: ClassVar[str] = "temperature"
  layer: int
  heads: tuple[int, ...] | None = None
  temperature: float

  def resolve(self, spec, load_donor=None):
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    return super().resolve(spec, load_donor)

  def claims(self, spec):
    c = empty_claims(spec)
    c["temperature"][self.layer, list(self.heads)] = True
    return c

  def slots(self):
    return (_TemperatureSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads, temperature=self.temperature)


@dataclasses.dataclass(frozen=True)
class _TemperatureSlot(Slot):
  layer: int

  @property
  def key(self):
    return f"temperature/{self.layer}"

  def empty(self, spec):
    return _heads_empty(spec, temperature=(1.0, np.float32))

  def tree(self, ctx, p):
    value = jnp.asarray(p["temperature"], jnp.float32)[None, :, None, None]
    return _attn(self.layer, temperature=Clamp(value, _head_mask(p["heads"])))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SilenceNonLabel(ClampSpec):
  """Lets heads attend only to label tokens at the query (scores of exemplar
  tokens, the query included, are -inf). The paper's version is for the last
  layer, the default. Needs a task with label tokens (`Layout.label_positions`).

  Attributes:
    heads: the heads (None: all heads of the layer).
    layer: the layer, default the last.
  """
  NAME: ClassVar[str] = "silence_non_label"
  heads: tuple[int, ...] | None = None
  layer: int = -1

  def resolve(self, spec, load_donor=None):
    _needs(spec, "label_positions", f"{self.NAME}()")
    return super().resolve(spec, load_donor)

  def claims(self, spec):
    c = empty_claims(spec)
    c["attention"][self.layer, list(self.heads)] = _silenced(spec)
    return c

  def slots(self):
    return (_SilenceSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads)


@dataclasses.dataclass(frozen=True)
class _SilenceSlot(Slot):
  layer: int

  @property
  def key(self):
    return f"silence_non_label/{self.layer}"

  def empty(self, spec):
    return _heads_empty(spec)

  def tree(self, ctx, p):
    mask = _head_mask(p["heads"]) & _silenced(ctx.spec)[None, None]
    return _attn(self.layer, scores=Clamp(jnp.float32(-jnp.inf), mask))


def _silenced(spec) -> np.ndarray:
  """[T, T]: at induction rows, every key that is not a label token."""
  lay = layout_of(spec)
  return _rows(lay.induction_rows, spec.seq_len)[:, None] & ~_label_rows(spec)[None, :]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CopyFromHead(ClampSpec):
  """A perfect copy circuit: the query's logits are one head's pre-softmax scores
  from the query to the label tokens.

  The logit of label y is the score of the label token holding y (the
  log-sum-exp of their scores if several tokens hold y, so that the output
  distribution is the head's attention restricted to label tokens); labels not
  in the context get -inf. The scores are those of this same forward pass,
  after every other clamp. Only the query's logits change. In general
  (`Targets`): at the read-out positions that are induction rows, the logit
  of output y is the log-sum-exp of the scores to the supported keys holding
  y (tokens: each earlier token copies itself).

  Attributes:
    head: the head.
    layer: its layer, default the last.
  """
  NAME: ClassVar[str] = "copy"
  head: int
  layer: int = -1

  def claims(self, spec):
    c = empty_claims(spec)
    c["logits"][:] = True
    return c

  def slots(self):
    return (_CopySlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    q = p[self.slots()[0].key]
    q["active"][...] = True
    q["head"][...] = self.head


@dataclasses.dataclass(frozen=True)
class _CopySlot(Slot):
  layer: int
  STAGE: ClassVar[int] = STAGE_POST

  @property
  def key(self):
    return f"copy/{self.layer}"

  def empty(self, spec):
    return {"active": np.zeros((), bool), "head": np.zeros((), np.int32)}

  def post(self, ctx, p, logits, acts):
    scores = acts[f"layer_{self.layer}"]["attn"]["scores"]  # [B, H, T, T]
    s = jnp.take(scores, jnp.asarray(p["head"]), axis=1)  # [B, T, T]
    tg, readout = ctx.targets, np.asarray(layout_of(ctx.spec).readout)
    copied = copy_logits(s[:, readout], tg.key_outputs, tg.support[:, readout],
                         ctx.spec.num_outputs)  # [B, R, L]
    rows = tg.rows[:, readout] & jnp.asarray(p["active"])  # [B, R]
    logits = jnp.where(rows[..., None], copied, logits)
    return logits, {**acts, "logits": logits}

def copy_logits(scores: jax.Array, key_outputs: jax.Array, support: jax.Array,
                num_outputs: int) -> jax.Array:
  """Logits of a perfect copy: per row and output, the log-sum-exp of the
  scores of the supported keys that hold the output (exactly the score when
  one key does); -inf for outputs no supported key holds.

  Args:
    scores: [B, R, K] scores from R rows to K keys.
    key_outputs: [B, K] the output each key holds (-1: none).
    support: [B, R, K] the keys each row may copy from.
    num_outputs: L.

  Returns:
    [B, R, L].
  """
  b, r, k = scores.shape
  held = support & (key_outputs[:, None, :] >= 0)  # [B, R, K]
  out = jnp.where(held, key_outputs[:, None, :], num_outputs)  # unheld: a spare output
  # The largest score per (row, output): a scatter-max (order-free, so
  # deterministic on every backend), without a [B, R, K, L] intermediate.
  seg = (jnp.arange(b * r).reshape(b, r, 1) * (num_outputs + 1) + out).reshape(-1)
  top = jax.ops.segment_max(jnp.where(held, scores, -jnp.inf).reshape(-1), seg,
                            num_segments=b * r * (num_outputs + 1))
  top = top.reshape(b, r, num_outputs + 1)[..., :num_outputs]  # [B, R, L]
  finite = jnp.isfinite(top)
  m0 = jax.lax.stop_gradient(jnp.where(finite, top, 0.0))
  m_key = jnp.take_along_axis(jnp.pad(m0, ((0, 0), (0, 0), (0, 1))), out, axis=-1)  # [B, R, K]
  # Mask before exp so unheld keys give exp(-inf) = 0, never inf * 0 in gradients.
  e = jnp.exp(jnp.where(held, scores - m_key, -jnp.inf))
  onehot = (key_outputs[:, :, None] == jnp.arange(num_outputs)).astype(scores.dtype)  # [B, K, L]
  total = jnp.einsum("brk,bkl->brl", e, onehot)
  ok = finite & (total > 0)
  return jnp.where(ok, m0 + jnp.log(jnp.where(ok, total, 1.0)), -jnp.inf)


PRESERVABLE = ("pattern", "scores", "q", "k", "v", "z")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preserve(ClampSpec):
  """Keeps activations from an unclamped first pass (two passes).

  With an ablation elsewhere this is the paper's pattern-preserving
  (`what=['pattern']`) or value-preserving (`what=['v']`) ablation: the
  ablation changes only what flows through the preserved activations'
  complement. Preserved entries have the lowest precedence: an entry that
  another clamp of the run sets, or that such a clamp feeds within the same
  head (a pattern row whose scores are clamped, or whose temperature is; z
  of a head whose values are ablated), is not preserved. With nothing else
  clamped the forward pass is bitwise the unclamped one. The preserved
  values are functions of the parameters (no stop-gradient), as in the
  paper's code.

  Attributes:
    what: sites among 'pattern', 'scores', 'q', 'k', 'v', 'z'.
    layers: the layers (None: all).
    heads: the heads (None: all).
  """
  NAME: ClassVar[str] = "preserve"
  what: tuple[str, ...] = ("pattern",)
  layers: tuple[int, ...] | None = None
  heads: tuple[int, ...] | None = None

  def resolve(self, spec, load_donor=None):
    bad = [w for w in self.what if w not in PRESERVABLE]
    if bad or not self.what:
      raise ValueError(f"what must name sites among {PRESERVABLE}, got {list(self.what)}")
    layers = (tuple(range(spec.num_layers)) if self.layers is None
              else tuple(sorted({_layer(l, spec) for l in self.layers})))
    return dataclasses.replace(self, layers=layers, heads=_heads(self.heads, spec))

  def slots(self):
    return tuple(_PreserveSlot(site=w) for w in self.what)

  def fill(self, p, spec, claimed):
    for w in self.what:
      m = np.zeros_like(p[f"preserve/{w}"]["mask"])
      for l in self.layers:
        m[l, list(self.heads)] = True
      if w in ("pattern", "scores"):
        rows_taken = claimed["attention"].any(-1) | claimed["temperature"][:, :, None]
        m &= ~rows_taken
      elif w == "z":
        m &= ~claimed["value"]
      p[f"preserve/{w}"]["mask"] |= m


@dataclasses.dataclass(frozen=True)
class _PreserveSlot(Slot):
  site: str
  STAGE: ClassVar[int] = STAGE_PRESERVE

  @property
  def key(self):
    return f"preserve/{self.site}"

  def empty(self, spec):
    # pattern/scores: per row [L, H, T]; q/k/v/z: per head [L, H].
    rows = (spec.seq_len,) if self.site in ("pattern", "scores") else ()
    return {"mask": np.zeros((spec.num_layers, spec.num_heads) + rows, bool)}

  def tree(self, ctx, p):
    out = {}
    for l in range(ctx.spec.num_layers):
      value = ctx.base[f"layer_{l}"]["attn"][self.site]
      m = jnp.asarray(p["mask"])[l]
      mask = m[None, :, :, None] if self.site in ("pattern", "scores") else m[None, None, :, None]
      out.update(_attn(l, **{self.site: Clamp(value, mask)}))
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layer1Clamp(ClampSpec):
  """The layer-1 clamp ("perfect previous-token input"; paper's
  `perfect_prev_token_input`): only the second layer learns its circuit.

  Three passes. (1) An unclamped pass gives the token embeddings e. (2) A
  pattern pass with the first layer's output (its residual stream after the
  block) set to e shifted by one position (position i in 1..T-2 holds e_{i-1},
  so each label token holds its exemplar; positions 0 and the query keep their
  own), as if the first layer were a perfect previous-token layer; its
  second-layer scores are kept. (3) The final pass sets the first layer's
  output to e (the first layer adds nothing) and the second layer's scores
  (all heads) to those of (2). The clamped values carry gradients, so the
  second layer's W_Q, W_K learn through pass (2) and its W_V, W_O through
  pass (3); the first layer's attention gets no gradient.

  The shift follows the paper's code; it needs the interleaved format of
  icldyn (exemplar, label, ..., query) and at least two layers. With additive
  (sinusoidal or learned) positions the shifted embeddings carry the shifted
  positions too; the paper used RoPE.
  """
  NAME: ClassVar[str] = "layer1"

  def resolve(self, spec, load_donor=None):
    _needs(spec, "layer1_source", f"{self.NAME}()")
    if spec.num_layers < 2:
      raise ValueError(f"needs at least 2 layers (model.num_layers={spec.num_layers})")
    return self

  def claims(self, spec):
    c = empty_claims(spec)
    c["resid"][0] = True
    c["attention"][1] = True
    c["temperature"][1] = True
    return c

  def slots(self):
    return (_Layer1Slot(),)

  def fill(self, p, spec, claimed):
    p["layer1"]["active"][...] = True


def take_static(x: jax.Array, index, axis: int) -> jax.Array:
  """`jnp.take(x, index, axis)` for a static index list, as slices of its
  runs of consecutive indices: the same values, and a gradient that is a sum
  of pads rather than a scatter-add, which XLA GPU runs with atomics when an
  index repeats (README: Determinism)."""
  index = [int(i) for i in index]
  pieces, start = [], 0
  while start < len(index):
    end = start + 1
    while end < len(index) and index[end] == index[end - 1] + 1:
      end += 1
    pieces.append(jax.lax.slice_in_dim(x, index[start], index[end - 1] + 1, axis=axis))
    start = end
  return jnp.concatenate(pieces, axis=axis)


@dataclasses.dataclass(frozen=True)
class _Layer1Slot(Slot):

  @property
  def key(self):
    return "layer1"

  def empty(self, spec):
    return {"active": np.zeros((), bool)}

  def tree(self, ctx, p):
    emb = ctx.base["embed"]  # [B, T, d]
    source = np.asarray(layout_of(ctx.spec).layer1_source)
    moved = source != np.arange(ctx.spec.seq_len)
    shifted = jnp.where(moved[None, :, None], take_static(emb, source, axis=1), emb)
    _, acts = ctx.run({"layer_0": {"resid_post": Clamp(shifted, True)}})
    active = jnp.asarray(p["active"])
    return merge({"layer_0": {"resid_post": Clamp(emb, active)}},
                 _attn(1, scores=Clamp(acts["layer_1"]["attn"]["scores"], active)))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class GraftIn(ClampSpec):
  """Runs a frozen donor model and splices its residual stream in after `layer`:
  this model's layers <= `layer` are replaced by the donor's.

  The donor is a checkpoint (`workdir`, `run`, `step`; step -1 = the newest
  stream checkpoint) or in-memory `params`; it must have this model's
  architecture. Donor parameters travel as per-run data, so runs can graft
  from different donors in one program; they are never trained.

  Attributes:
    layer: the last donor layer.
    workdir, run, step: the donor checkpoint (icldyn workdir).
    params: donor parameters (unbatched), instead of a checkpoint.
  """
  NAME: ClassVar[str] = "graft_in"
  layer: int
  workdir: str | None = None
  run: int = 0
  step: int = -1
  params: Any = dataclasses.field(default=None, repr=False)

  def resolve(self, spec, load_donor=None):
    layer = _layer(self.layer, spec)
    if self.params is None and self.workdir is None:
      raise ValueError("needs a donor: workdir=... (or params in Python)")
    if self.params is None and load_donor is None:
      if not os.path.isfile(os.path.join(self.workdir, "config.json")):
        raise ValueError(f"no icldyn workdir at {self.workdir!r}")
      return dataclasses.replace(self, layer=layer)
    params = self.params
    if params is None:
      donor_spec, params = load_donor(self.workdir, self.run, self.step)
      if donor_spec != spec:
        diff = [f.name for f in dataclasses.fields(spec)
                if getattr(spec, f.name) != getattr(donor_spec, f.name)]
        diff += [f"front.{f.name}" for f in dataclasses.fields(spec.front)
                 if "front" in diff and getattr(spec.front, f.name) != getattr(donor_spec.front, f.name)]
        diff = [d for d in diff if d != "front"] if len(diff) > 1 else diff
        raise ValueError(f"the donor's architecture differs from this model's in {diff}")
    _check_param_shapes(params, spec)
    return dataclasses.replace(self, layer=layer, params=params)

  def claims(self, spec):
    c = empty_claims(spec)
    c["resid"][self.layer] = True
    return c

  def slots(self):
    return (_GraftInSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    q = p[self.slots()[0].key]
    q["active"][...] = True
    q["params"] = jax.tree.map(lambda x: np.asarray(x, np.float32), self.params)


@dataclasses.dataclass(frozen=True)
class _GraftInSlot(Slot):
  layer: int
  STAGE: ClassVar[int] = STAGE_GRAFT_IN

  @property
  def key(self):
    return f"graft_in/{self.layer}"

  def empty(self, spec):
    return {"active": np.zeros((), bool),
            "params": jax.tree.map(lambda s: np.zeros(s.shape, np.float32), _param_shapes(spec))}

  def tree(self, ctx, p):
    _, acts = ctx.run(None, params=p["params"])
    name = f"layer_{self.layer}"
    return {name: {"resid_post": Clamp(acts[name]["resid_post"], jnp.asarray(p["active"]))}}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class GraftOut(GraftIn):
  """Feeds this model's residual stream after `layer` into a frozen donor's later
  layers: the donor's layers > `layer`, final LayerNorm and unembedding make
  the logits (and the later layers' activations). Gradients flow through the
  donor into this model's layers <= `layer`. Donor as for `GraftIn`.
  """
  NAME: ClassVar[str] = "graft_out"

  def claims(self, spec):
    c = empty_claims(spec)
    c["logits"][:] = True
    return c

  def slots(self):
    return (_GraftOutSlot(layer=self.layer),)


@dataclasses.dataclass(frozen=True)
class _GraftOutSlot(_GraftInSlot):
  STAGE: ClassVar[int] = STAGE_POST + 1

  @property
  def key(self):
    return f"graft_out/{self.layer}"

  def tree(self, ctx, p):
    return {}

  def post(self, ctx, p, logits, acts):
    name = f"layer_{self.layer}"
    d_logits, d_acts = ctx.run({name: {"resid_post": Clamp(acts[name]["resid_post"], True)}},
                               params=p["params"])
    active = jnp.asarray(p["active"])

    def pick(new, old):
      if isinstance(new, dict):
        return {k: pick(v, old[k]) if k in old else v for k, v in new.items()}
      return jnp.where(active, new, old)

    acts = dict(acts)
    for l in range(self.layer + 1, ctx.spec.num_layers):
      acts[f"layer_{l}"] = pick(d_acts[f"layer_{l}"], acts[f"layer_{l}"])
    acts["resid_final"] = pick(d_acts["resid_final"], acts["resid_final"])
    acts["logits"] = pick(d_logits, logits)
    return acts["logits"], acts


CATALOGUE: tuple[type[ClampSpec], ...] = (
    AblateHeads, PrevTokenPattern, InductionPattern, DisallowPrevToken, MatchPattern,
    HeadTemperature, SilenceNonLabel, CopyFromHead, Preserve, Layer1Clamp, GraftIn, GraftOut)

BY_NAME = {c.NAME: c for c in CATALOGUE}


@functools.lru_cache(maxsize=8)
def _param_shapes(spec):
  """The parameter tree of a model as ShapeDtypeStructs (traced, not compiled)."""
  return jax.eval_shape(lambda: model_lib.init_params(spec, 0))

def _check_param_shapes(params, spec) -> None:
  want = _param_shapes(spec)
  try:
    fits = jax.tree.map(lambda w, g: tuple(w.shape) == tuple(np.shape(g)), want, params)
  except (ValueError, TypeError):
    fits = [False]
  if not all(jax.tree.leaves(fits)):
    raise ValueError("the donor's parameters do not fit this model's architecture")
