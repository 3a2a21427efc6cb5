"""Clamps: values + masks at nodes of the activation tree ("artificial optogenetics").

A clamp tree mirrors the model's activation tree (docs/interfaces.md) on any
subset of its nodes. Each leaf is a `Clamp(value, mask)`; the model applies
`where(mask, value, computed)` right where the activation is made, so
downstream computation uses the clamped value and no gradient reaches the
computed value through clamped entries (Singh et al. 2024, arXiv 2404.07129,
after the `cache`/`cache_mask` pair of their code).

On top of that mechanism this module owns the paper's catalogue of
interventions as typed constructors (`AblateHeads`, `PrevTokenPattern`,
`InductionPattern`, `DisallowPrevToken`, `MatchPattern`, `HeadTemperature`,
`SilenceNonLabel`, `CopyFromHead`, `Preserve`, `Layer1Clamp`, `GraftIn`,
`GraftOut`), and turns a list of them per run into a *plan*: a hashable
description of the clamped sites (static, part of the compiled program) plus
a pytree of per-run arrays (which heads, how strong, on or off). Runs of a
grid that differ only in those arrays share one compiled program; a group
whose runs use different clamps uses the union of their sites, each masked
off in the runs that do not use it. A site absent from the plan costs nothing.

Order of precedence when a run has several clamps (docs/clamps.md):
  1. graft_in      the residual stream after a layer comes from a frozen donor;
  2. preserve      activations of an unclamped first pass; they fill only what
                   no other clamp of the run touches (as in the paper's code,
                   where every other clamp overrides a preserved activation);
  3. entry clamps  ablate, prev_token, induction, match, disallow_prev_token,
                   silence_non_label, temperature, layer1: each entry is owned
                   by at most one of them; two claiming the same entry (same
                   layer, head and attention entry; same head's values; same
                   residual stream) is a ConfigError;
  4. copy          the query's logits from a head's final scores;
  5. graft_out     the logits from a donor's later layers.
Copy and graft_out both own the logits, so they exclude each other too.

The config forms (`clamps`, `clamp.keep_head`, `clamp.condition`,
`clamp.strength`, `eval.clamps`) are parsed here; see `parse`,
`CONDITIONS`, `named_plan` and `plans_for_group`.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from icldyn.config import ConfigError


class Clamp(NamedTuple):
  """A clamp at one activation site.

  Attributes:
    value: array broadcastable to the activation's shape.
    mask: bool array broadcastable to the activation's shape; True = clamped.
  """
  value: jax.Array
  mask: jax.Array


def apply_clamp(computed: jax.Array, clamp: Clamp | None) -> jax.Array:
  """Returns `where(mask, value, computed)`, or `computed` if there is no clamp."""
  if clamp is None:
    return computed
  value = jnp.asarray(clamp.value, computed.dtype)
  return jnp.where(clamp.mask, value, computed)


def is_clamp(x) -> bool:
  """Whether `x` is a Clamp leaf (for `jax.tree.map(..., is_leaf=is_clamp)`)."""
  return isinstance(x, Clamp)


def merge(*trees: dict) -> dict:
  """Merges clamp trees; two clamps on the same site are combined by mask.

  Where both masks are True on the same entry the later tree takes precedence
  entry-wise. The catalogue never relies on that except for `Preserve`
  (lowest precedence); `conflicts` finds such entries in concrete trees, and
  the plans check their clamps' claims before anything is compiled.
  """
  out: dict = {}
  for tree in trees:
    for name, node in (tree or {}).items():
      if name not in out:
        out[name] = node
      elif isinstance(node, Clamp):
        prev = out[name]
        out[name] = Clamp(jnp.where(node.mask, node.value, prev.value),
                          jnp.logical_or(node.mask, prev.mask))
      else:
        out[name] = merge(out[name], node)
  return out


def conflicts(*trees: dict) -> list[str]:
  """Sites ('layer_1/attn/pattern', ...) where two concrete trees' masks overlap."""
  seen: dict[str, np.ndarray] = {}
  found = []
  for tree in trees:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_clamp)[0]:
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      mask = np.asarray(leaf.mask, bool)
      if name in seen:
        a, b = np.broadcast_arrays(seen[name], mask)
        if np.any(a & b) and name not in found:
          found.append(name)
        seen[name] = a | b
      else:
        seen[name] = mask
  return found


# --------------------------------------------------------------------------
# The catalogue: typed constructors.
#
# A constructor is a frozen, keyword-only dataclass. `resolve` checks it
# against a model (negative layers count from the end, `heads=None` means all
# heads); `claims` says which entries it owns (for conflicts); `slots` are the
# static sites it needs; `fill` writes its per-run arrays.

def _empty_claims(spec) -> dict[str, np.ndarray]:
  """Claim arrays: attention [L, H, T, T], value/temperature [L, H], resid [L], logits [1]."""
  l, h, t = spec.num_layers, spec.num_heads, spec.seq_len
  return {"attention": np.zeros((l, h, t, t), bool), "value": np.zeros((l, h), bool),
          "temperature": np.zeros((l, h), bool), "resid": np.zeros((l,), bool),
          "logits": np.zeros((1,), bool)}


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

  def resolve(self, spec, load: bool = True) -> "ClampSpec":
    """This clamp with layers and heads made explicit for `spec` (ValueError if invalid)."""
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
    return _empty_claims(spec)

  def slots(self) -> tuple["_Slot", ...]:
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
      args.append(f"{f.name}={_render_value(v)}")
    return f"{self.NAME}({', '.join(args)})"


def _render_value(v) -> str:
  if isinstance(v, tuple):
    return "[" + ", ".join(_render_value(x) for x in v) + "]"
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

  def resolve(self, spec, load=True):
    if self.site not in ("v", "z"):
      raise ValueError(f"site must be 'v' or 'z', got {self.site!r}")
    return super().resolve(spec, load)

  def claims(self, spec):
    c = _empty_claims(spec)
    c["value"][self.layer, list(self.heads)] = True
    return c

  def slots(self):
    return (_AblateSlot(layer=self.layer, site=self.site),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads)


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

  def claims(self, spec):
    c = _empty_claims(spec)
    rows = _label_rows(spec) if self.only_labels else np.ones(spec.seq_len, bool)
    c["attention"][self.layer, list(self.heads)] = rows[:, None]
    return c

  def slots(self):
    return (_PrevTokenSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads, strength=self.strength,
               only_labels=self.only_labels)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InductionPattern(ClampSpec):
  """Fixes heads' attention at the query to the perfect induction pattern.

  The query attends with total weight s to the label tokens that follow an
  exemplar of the query's class and spreads 1 - s evenly over the other label
  tokens; exemplar tokens get 0. With two pairs (one of the query's class)
  this is the paper's clamp, whose induction strength is 2s - 1. If every
  context exemplar is of the query's class they share all the weight; if none
  is, the query attends uniformly to the label tokens. Works for any context
  length; only the query's row is clamped.

  Attributes:
    layer, heads: the heads (heads=None: all heads of the layer).
    strength: s in [0, 1].
  """
  NAME: ClassVar[str] = "induction"
  layer: int
  heads: tuple[int, ...] | None = None
  strength: float = 1.0

  def claims(self, spec):
    c = _empty_claims(spec)
    c["attention"][self.layer, list(self.heads), -1, :] = True
    return c

  def slots(self):
    return (_InductionSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads, strength=self.strength)


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

  def claims(self, spec):
    c = _empty_claims(spec)
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatchPattern(ClampSpec):
  """Fixes heads' attention at the query by exemplar similarity ("match heads").

  The query attends to the label token after each context exemplar with
  weight softmax_i(cos(x_i, x_q) / temperature) over the context exemplars
  (temperature 0: a hard max, ties shared); exemplar tokens get 0. This is
  W_K^T W_Q = I / temperature on the raw exemplars, ignoring positions.
  Works for any context length; only the query's row is clamped.

  Attributes:
    layer, heads: the heads (heads=None: all heads of the layer).
    temperature: >= 0.
  """
  NAME: ClassVar[str] = "match"
  layer: int
  heads: tuple[int, ...] | None = None
  temperature: float = 0.0

  def resolve(self, spec, load=True):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    return super().resolve(spec, load)

  def claims(self, spec):
    c = _empty_claims(spec)
    c["attention"][self.layer, list(self.heads), -1, :] = True
    return c

  def slots(self):
    return (_MatchSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads, temperature=self.temperature)


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

  def resolve(self, spec, load=True):
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    return super().resolve(spec, load)

  def claims(self, spec):
    c = _empty_claims(spec)
    c["temperature"][self.layer, list(self.heads)] = True
    return c

  def slots(self):
    return (_TemperatureSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads, temperature=self.temperature)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SilenceNonLabel(ClampSpec):
  """Lets heads attend only to label tokens at the query (scores of exemplar
  tokens, the query included, are -inf). The paper's version is for the last
  layer, the default.

  Attributes:
    heads: the heads (None: all heads of the layer).
    layer: the layer, default the last.
  """
  NAME: ClassVar[str] = "silence_non_label"
  heads: tuple[int, ...] | None = None
  layer: int = -1

  def claims(self, spec):
    c = _empty_claims(spec)
    c["attention"][self.layer, list(self.heads), -1, 0::2] = True
    return c

  def slots(self):
    return (_SilenceSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    _set_heads(p[self.slots()[0].key], self.heads)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CopyFromHead(ClampSpec):
  """A perfect copy circuit: the query's logits are one head's pre-softmax scores
  from the query to the label tokens.

  The logit of label y is the score of the label token holding y (the
  log-sum-exp of their scores if several tokens hold y, so that the output
  distribution is the head's attention restricted to label tokens); labels not
  in the context get -inf. The scores are those of this same forward pass,
  after every other clamp. Only the query's logits change.

  Attributes:
    head: the head.
    layer: its layer, default the last.
  """
  NAME: ClassVar[str] = "copy"
  head: int
  layer: int = -1

  def claims(self, spec):
    c = _empty_claims(spec)
    c["logits"][:] = True
    return c

  def slots(self):
    return (_CopySlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    q = p[self.slots()[0].key]
    q["active"][...] = True
    q["head"][...] = self.head


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

  def resolve(self, spec, load=True):
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

  def resolve(self, spec, load=True):
    if spec.num_layers < 2:
      raise ValueError(f"needs at least 2 layers (model.num_layers={spec.num_layers})")
    return self

  def claims(self, spec):
    c = _empty_claims(spec)
    c["resid"][0] = True
    c["attention"][1] = True
    c["temperature"][1] = True
    return c

  def slots(self):
    return (_Layer1Slot(),)

  def fill(self, p, spec, claimed):
    p["layer1"]["active"][...] = True


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

  def resolve(self, spec, load=True):
    layer = _layer(self.layer, spec)
    if self.params is None and self.workdir is None:
      raise ValueError("needs a donor: workdir=... (or params in Python)")
    if self.params is None and not load:
      if not os.path.isfile(os.path.join(self.workdir, "config.json")):
        raise ValueError(f"no icldyn workdir at {self.workdir!r}")
      return dataclasses.replace(self, layer=layer)
    params = self.params
    if params is None:
      donor_spec, params = load_donor(self.workdir, self.run, self.step)
      if donor_spec != spec:
        diff = [f.name for f in dataclasses.fields(spec)
                if getattr(spec, f.name) != getattr(donor_spec, f.name)]
        raise ValueError(f"the donor's architecture differs from this model's in {diff}")
    _check_param_shapes(params, spec)
    return dataclasses.replace(self, layer=layer, params=params)

  def claims(self, spec):
    c = _empty_claims(spec)
    c["resid"][self.layer] = True
    return c

  def slots(self):
    return (_GraftInSlot(layer=self.layer),)

  def fill(self, p, spec, claimed):
    q = p[self.slots()[0].key]
    q["active"][...] = True
    q["params"] = jax.tree.map(lambda x: np.asarray(x, np.float32), self.params)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class GraftOut(GraftIn):
  """Feeds this model's residual stream after `layer` into a frozen donor's later
  layers: the donor's layers > `layer`, final LayerNorm and unembedding make
  the logits (and the later layers' activations). Gradients flow through the
  donor into this model's layers <= `layer`. Donor as for `GraftIn`.
  """
  NAME: ClassVar[str] = "graft_out"

  def claims(self, spec):
    c = _empty_claims(spec)
    c["logits"][:] = True
    return c

  def slots(self):
    return (_GraftOutSlot(layer=self.layer),)


CATALOGUE: tuple[type[ClampSpec], ...] = (
    AblateHeads, PrevTokenPattern, InductionPattern, DisallowPrevToken, MatchPattern,
    HeadTemperature, SilenceNonLabel, CopyFromHead, Preserve, Layer1Clamp, GraftIn, GraftOut)
_BY_NAME = {c.NAME: c for c in CATALOGUE}


def _label_rows(spec) -> np.ndarray:
  return np.arange(spec.seq_len) % 2 == 1


@functools.lru_cache(maxsize=8)
def _param_shapes(spec):
  """The parameter tree of a model as ShapeDtypeStructs (traced, not compiled)."""
  from icldyn import model as model_lib
  return jax.eval_shape(lambda: model_lib.init_params(spec, 0))


def _check_param_shapes(params, spec) -> None:
  want = _param_shapes(spec)
  try:
    fits = jax.tree.map(lambda w, g: tuple(w.shape) == tuple(np.shape(g)), want, params)
  except (ValueError, TypeError):
    fits = [False]
  if not all(jax.tree.leaves(fits)):
    raise ValueError("the donor's parameters do not fit this model's architecture")


@functools.lru_cache(maxsize=16)
def load_donor(workdir: str, run: int = 0, step: int = -1):
  """A donor's model spec and parameters from an icldyn workdir's checkpoint stream.

  Args:
    workdir: the donor's workdir.
    run: the donor's run index (runs.csv).
    step: training sequences of the stream checkpoint; -1 = the newest.

  Returns:
    (ModelSpec, params as numpy arrays).
  """
  from icldyn import checkpoint as ckpt_lib
  from icldyn import model as model_lib
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      cfg = json.load(f)["config"]
    with open(os.path.join(workdir, "runs.csv"), newline="") as f:
      rows = {int(r["run"]): r for r in csv.DictReader(f)}
  except (OSError, KeyError, ValueError) as e:
    raise ValueError(f"cannot read the donor workdir {workdir!r}: {e}") from e
  if run not in rows:
    raise ValueError(f"the donor workdir has no run {run}")
  row = rows[run]
  group, index = int(row["group"]), int(row["group_index"])
  store = ckpt_lib.Store(workdir, group, read_only=True)
  try:
    steps = store.stream_steps()
  finally:
    store.close()
  if not steps:
    raise ValueError(f"the donor workdir {workdir!r} has no stream checkpoints")
  if step < 0:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"no donor checkpoint at step {step} (have {steps})")
  params = ckpt_lib.restore_run(workdir, step, group, index)

  def setting(field):  # the run's own value if the grid varied it, else the config's
    node = cfg
    for part in field.split("."):
      node = node[part]
    text = row.get(field)
    if not text:
      return node
    return float(text) if node is None else type(node)(text)

  num_layers = len([k for k in params if k.startswith("layer_")])
  _, num_heads, _ = np.shape(params["layer_0"]["attn"]["w_q"])
  input_dim, d_model = np.shape(params["embed_x"]["kernel"])
  spec = model_lib.ModelSpec(
      num_layers=num_layers, num_heads=int(num_heads), d_model=int(d_model),
      num_labels=int(np.shape(params["embed_y"]["embedding"])[0]),
      context_len=setting("data.context_len"), input_dim=int(input_dim),
      pos_embedding=setting("model.pos_embedding"), layer_norm="ln_final" in params,
      mlp_ratio=setting("model.mlp_ratio"), rope_base=setting("model.rope_base"))
  return spec, jax.tree.map(np.asarray, params)


# --------------------------------------------------------------------------
# Slots: the static sites of a plan and what they compute in the graph.
#
# Each slot has a key in the per-run params dict, `empty` arrays for a run
# that does not use it, and either a clamp-tree fragment (`tree`) applied in
# the main pass or a post-processing of its outputs (`post`).

_STAGE_GRAFT_IN, _STAGE_PRESERVE, _STAGE_ENTRY, _STAGE_POST = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class _Slot:
  STAGE: ClassVar[int] = _STAGE_ENTRY

  @property
  def key(self) -> str:
    raise NotImplementedError

  def empty(self, spec) -> dict:
    raise NotImplementedError

  def tree(self, ctx: "_Context", p: dict) -> dict:
    return {}

  def post(self, ctx: "_Context", p: dict, logits, acts):
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


@dataclasses.dataclass(frozen=True)
class _AblateSlot(_Slot):
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


@dataclasses.dataclass(frozen=True)
class _PrevTokenSlot(_Slot):
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
    rows = jnp.where(jnp.asarray(p["only_labels"])[:, None], _label_rows(ctx.spec)[None, :], True)
    mask = (jnp.asarray(p["heads"])[:, None] & rows)[None, :, :, None]  # [1, H, T, 1]
    return _attn(self.layer, pattern=Clamp(value[None], mask))


def _query_row_mask(heads, spec) -> jax.Array:
  rows = np.arange(spec.seq_len) == spec.seq_len - 1
  return jnp.asarray(heads)[None, :, None, None] & rows[None, None, :, None]


def _label_row(weights: jax.Array, spec) -> jax.Array:
  """[B, H, C] weights on the label tokens → [B, H, 1, T] query rows."""
  b, h, _ = weights.shape
  row = jnp.zeros((b, h, spec.seq_len), weights.dtype).at[:, :, 1::2].set(weights)
  return row[:, :, None, :]


@dataclasses.dataclass(frozen=True)
class _InductionSlot(_Slot):
  layer: int

  @property
  def key(self):
    return f"induction/{self.layer}"

  def empty(self, spec):
    return _heads_empty(spec, strength=(1.0, np.float32))

  def tree(self, ctx, p):
    c = ctx.spec.context_len
    classes = ctx.batch.classes
    correct = (classes[:, :-1] == classes[:, -1:])[:, None, :]  # [B, 1, C]
    n_c = jnp.sum(correct, -1, keepdims=True).astype(jnp.float32)
    n_o = c - n_c
    s = jnp.asarray(p["strength"], jnp.float32)[None, :, None]  # [1, H, 1]
    w_c = jnp.where(n_o > 0, s, 1.0) / jnp.maximum(n_c, 1.0)
    w_o = (1.0 - s) / jnp.maximum(n_o, 1.0)
    w = jnp.where(correct, w_c, w_o)
    w = jnp.where(n_c > 0, w, 1.0 / c)  # query class absent: uniform over labels
    return _attn(self.layer, pattern=Clamp(_label_row(w, ctx.spec),
                                           _query_row_mask(p["heads"], ctx.spec)))


@dataclasses.dataclass(frozen=True)
class _MatchSlot(_Slot):
  layer: int

  @property
  def key(self):
    return f"match/{self.layer}"

  def empty(self, spec):
    return _heads_empty(spec, temperature=(0.0, np.float32))

  def tree(self, ctx, p):
    x = ctx.batch.inputs
    xn = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
    sims = jnp.einsum("bcd,bd->bc", xn[:, :-1], xn[:, -1])  # [B, C] cosine similarity
    hard = (sims == jnp.max(sims, -1, keepdims=True)).astype(jnp.float32)
    hard = hard / jnp.sum(hard, -1, keepdims=True)
    tau = jnp.asarray(p["temperature"], jnp.float32)[None, :, None]  # [1, H, 1]
    soft = jax.nn.softmax(sims[:, None, :] / jnp.where(tau > 0, tau, 1.0), axis=-1)
    w = jnp.where(tau > 0, soft, hard[:, None, :])
    return _attn(self.layer, pattern=Clamp(_label_row(w, ctx.spec),
                                           _query_row_mask(p["heads"], ctx.spec)))


@dataclasses.dataclass(frozen=True)
class _DisallowSlot(_Slot):
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
    rows = jnp.where(jnp.asarray(p["only_labels"])[:, None], _label_rows(ctx.spec)[None, :], True)
    mask = jnp.asarray(p["heads"])[:, None, None] & rows[:, :, None] & prev[None]
    return _attn(self.layer, scores=Clamp(jnp.float32(-jnp.inf), mask[None]))


@dataclasses.dataclass(frozen=True)
class _SilenceSlot(_Slot):
  layer: int

  @property
  def key(self):
    return f"silence_non_label/{self.layer}"

  def empty(self, spec):
    return _heads_empty(spec)

  def tree(self, ctx, p):
    t = ctx.spec.seq_len
    i = np.arange(t)
    entries = (i == t - 1)[:, None] & (i % 2 == 0)[None, :]  # query row, exemplar keys
    mask = _head_mask(p["heads"]) & entries[None, None]
    return _attn(self.layer, scores=Clamp(jnp.float32(-jnp.inf), mask))


@dataclasses.dataclass(frozen=True)
class _TemperatureSlot(_Slot):
  layer: int

  @property
  def key(self):
    return f"temperature/{self.layer}"

  def empty(self, spec):
    return _heads_empty(spec, temperature=(1.0, np.float32))

  def tree(self, ctx, p):
    value = jnp.asarray(p["temperature"], jnp.float32)[None, :, None, None]
    return _attn(self.layer, temperature=Clamp(value, _head_mask(p["heads"])))


@dataclasses.dataclass(frozen=True)
class _PreserveSlot(_Slot):
  site: str
  STAGE: ClassVar[int] = _STAGE_PRESERVE

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


@dataclasses.dataclass(frozen=True)
class _Layer1Slot(_Slot):

  @property
  def key(self):
    return "layer1"

  def empty(self, spec):
    return {"active": np.zeros((), bool)}

  def tree(self, ctx, p):
    emb = ctx.base["embed"]  # [B, T, d]
    shifted = emb.at[:, 1:-1].set(emb[:, :-2])
    _, acts = ctx.run({"layer_0": {"resid_post": Clamp(shifted, True)}})
    active = jnp.asarray(p["active"])
    return merge({"layer_0": {"resid_post": Clamp(emb, active)}},
                 _attn(1, scores=Clamp(acts["layer_1"]["attn"]["scores"], active)))


@dataclasses.dataclass(frozen=True)
class _GraftInSlot(_Slot):
  layer: int
  STAGE: ClassVar[int] = _STAGE_GRAFT_IN

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


@dataclasses.dataclass(frozen=True)
class _CopySlot(_Slot):
  layer: int
  STAGE: ClassVar[int] = _STAGE_POST

  @property
  def key(self):
    return f"copy/{self.layer}"

  def empty(self, spec):
    return {"active": np.zeros((), bool), "head": np.zeros((), np.int32)}

  def post(self, ctx, p, logits, acts):
    scores = acts[f"layer_{self.layer}"]["attn"]["scores"][:, :, -1, 1::2]  # [B, H, C]
    s = jnp.take(scores, jnp.asarray(p["head"]), axis=1)  # [B, C]
    copied = copy_logits(s, ctx.batch.labels[:, :-1], ctx.spec.num_labels)
    query = jnp.where(jnp.asarray(p["active"]), copied, logits[:, -1])
    logits = logits.at[:, -1].set(query)
    return logits, {**acts, "logits": logits}


def copy_logits(scores: jax.Array, labels: jax.Array, num_labels: int) -> jax.Array:
  """Logits of a perfect copy: per label, the log-sum-exp of the scores of the
  label tokens that hold it (exactly the score when one token does); -inf for
  labels not in the context.

  Args:
    scores: [B, C] scores from the query to the C label tokens.
    labels: [B, C] the labels those tokens hold.
    num_labels: L.

  Returns:
    [B, L].
  """
  match = labels[:, :, None] == jnp.arange(num_labels)[None, None, :]  # [B, C, L]
  m = jnp.max(jnp.where(match, scores[:, :, None], -jnp.inf), axis=1)  # [B, L]
  finite = jnp.isfinite(m)
  m0 = jax.lax.stop_gradient(jnp.where(finite, m, 0.0))
  # Mask before exp so unmatched entries give exp(-inf) = 0, never inf * 0 in gradients.
  e = jnp.exp(jnp.where(match, scores[:, :, None] - m0[:, None, :], -jnp.inf))
  total = jnp.sum(e, axis=1)
  ok = finite & (total > 0)
  return jnp.where(ok, m0 + jnp.log(jnp.where(ok, total, 1.0)), -jnp.inf)


@dataclasses.dataclass(frozen=True)
class _GraftOutSlot(_GraftInSlot):
  STAGE: ClassVar[int] = _STAGE_POST + 1

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


class _Context:
  """One run's forward inputs, with the passes clamps need computed once."""

  def __init__(self, spec, params, batch, num_labels):
    self.spec, self.params, self.batch, self.num_labels = spec, params, batch, num_labels

  def run(self, clamps: dict | None, params=None):
    from icldyn import model as model_lib
    return model_lib.apply(self.spec, self.params if params is None else params,
                           self.batch.inputs, self.batch.labels, self.num_labels, clamps,
                           self.batch.table_rows)

  @functools.cached_property
  def base(self) -> dict:
    """Activations of the unclamped pass."""
    return self.run(None)[1]


# --------------------------------------------------------------------------
# Plans.


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a forward pass applies clamps (hashable: part of the compiled program).

  Attributes:
    slots: the clamped sites, in order of precedence.
    fixed: for a plan with constant clamps (named evaluation plans), its
      resolved clamps; the per-run params are then built at trace time and
      `clamp_params` is ignored. None: per-run params come from `clamp_params`.
  """
  slots: tuple[_Slot, ...]
  fixed: tuple[ClampSpec, ...] | None = None

  def forward(self, spec, params, batch, num_labels, clamp_params):
    """Logits and activations of one run under this plan.

    Args:
      spec: the ModelSpec.
      params: the run's parameters.
      batch: a `data.Batch` ([B, ...], no run axis).
      num_labels: [] the run's label count.
      clamp_params: the run's slice of the per-run clamp arrays (ignored by a
        fixed plan).

    Returns:
      (logits [B, C+1, L], acts), as `model.apply`.
    """
    p = clamp_params if self.fixed is None else _run_params(self.slots, self.fixed, spec)
    ctx = _Context(spec, params, batch, num_labels)
    tree = merge(*(s.tree(ctx, p[s.key]) for s in self.slots))
    logits, acts = ctx.run(tree)
    for s in self.slots:
      logits, acts = s.post(ctx, p[s.key], logits, acts)
    return logits, acts


def _sort_slots(slots) -> tuple[_Slot, ...]:
  return tuple(sorted(set(slots), key=lambda s: (s.STAGE, s.key)))


def _run_params(slots, clamps: Sequence[ClampSpec], spec) -> dict:
  """Host arrays of one run: every slot's arrays, filled by the run's clamps."""
  p = {s.key: s.empty(spec) for s in slots}
  claimed = _empty_claims(spec)
  for c in clamps:
    if not isinstance(c, Preserve):
      for fam, arr in c.claims(spec).items():
        claimed[fam] |= arr
  for c in clamps:
    c.fill(p, spec, claimed)
  return p


def check_conflicts(spec, clamps: Sequence[ClampSpec], fields: Sequence[str] | None = None) -> None:
  """Raises ConfigError if two resolved clamps of one run claim the same entry."""
  fields = list(fields) if fields is not None else ["clamps"] * len(clamps)
  owner = {fam: np.full(arr.shape, -1) for fam, arr in _empty_claims(spec).items()}
  for i, c in enumerate(clamps):
    for fam, arr in c.claims(spec).items():
      clash = arr & (owner[fam] >= 0)
      if np.any(clash):
        where = np.argwhere(clash)[0]
        other = clamps[int(owner[fam][tuple(where)])]
        raise ConfigError(fields[i], f"{other.render()} and {c.render()} both clamp "
                          f"{_describe_entry(fam, where)}")
      owner[fam][arr] = i


def _describe_entry(family: str, idx) -> str:
  if family == "attention":
    return f"the attention of layer {idx[0]} head {idx[1]} at position {idx[2]} (key {idx[3]})"
  if family == "value":
    return f"the values of layer {idx[0]} head {idx[1]}"
  if family == "temperature":
    return f"the scores of layer {idx[0]} head {idx[1]}"
  if family == "resid":
    return f"the residual stream after layer {idx[0]}"
  return "the logits"


def resolve(spec, clamps: Sequence[ClampSpec], field: str = "clamps",
            load: bool = True) -> tuple[ClampSpec, ...]:
  """Clamps checked against a model (ConfigError naming `field` if invalid)."""
  out = []
  for c in clamps:
    if not isinstance(c, ClampSpec):
      raise ConfigError(field, f"not a clamp: {c!r}")
    try:
      out.append(c.resolve(spec, load))
    except ConfigError:
      raise
    except ValueError as e:
      raise ConfigError(field, f"{c.render()}: {e}") from e
  return tuple(out)


def build(spec, runs: Sequence[Sequence[ClampSpec]], field: str = "clamps"):
  """The plan and stacked per-run arrays of a group of runs.

  Args:
    spec: the group's ModelSpec.
    runs: per run, its clamps (constructors; resolved here).
    field: config field named in errors.

  Returns:
    (Plan, params with a leading run axis [R, ...]), or (None, None) when no
    run has a clamp.
  """
  resolved = [resolve(spec, r, field) for r in runs]
  for r in resolved:
    check_conflicts(spec, r, [field] * len(r))
  return _build_resolved(spec, resolved)


def _build_resolved(spec, resolved):
  slots = _sort_slots(s for r in resolved for c in r for s in c.slots())
  if not slots:
    return None, None
  per_run = [_run_params(slots, r, spec) for r in resolved]
  return Plan(slots), jax.tree.map(lambda *xs: np.stack(xs), *per_run)


def fixed_plan(spec, clamps: Sequence[ClampSpec], field: str = "eval.clamps") -> Plan:
  """A plan with constant clamps (e.g. for analysing checkpoints):
  `plan.forward(spec, params, batch, num_labels, None)`. Grafts need per-run
  params and are not allowed here."""
  resolved = resolve(spec, clamps, field)
  if any(isinstance(c, GraftIn) for c in resolved):
    raise ConfigError(field, "graft_in/graft_out need per-run donor parameters; use build()")
  check_conflicts(spec, resolved, [field] * len(resolved))
  return Plan(_sort_slots(s for c in resolved for s in c.slots()), fixed=resolved)


# --------------------------------------------------------------------------
# Config forms.


def parse(text: str, field: str = "clamps") -> tuple[ClampSpec, ...]:
  """Parses the config form of a list of clamps.

  The form is constructor calls with keyword arguments joined by '+', e.g.
  `ablate(layer=1, heads=[0, 2]) + prev_token(layer=0, heads=[2], strength=0.9)`.
  Values are Python literals; lists are written [a, b]; true/false/none and
  bare names (site=z, what=[pattern, v]) are accepted too.

  Raises:
    ConfigError(field, ...): on anything else.
  """
  text = (text or "").strip()
  if not text:
    return ()
  example = "e.g. ablate(layer=1, heads=[0, 2]) + prev_token(layer=0, heads=[1])"
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError as e:
    raise ConfigError(field, f"cannot parse {text!r}: expected clamp calls joined by '+', "
                      f"{example}") from e
  calls = []

  def flatten(n):
    if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Add):
      flatten(n.left)
      flatten(n.right)
    else:
      calls.append(n)

  flatten(node)
  out = []
  for call in calls:
    src = ast.get_source_segment(text, call) or ast.dump(call)
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
      raise ConfigError(field, f"{src!r} is not a clamp call; {example}")
    name = call.func.id
    cls = _BY_NAME.get(name)
    if cls is None:
      raise ConfigError(field, f"unknown clamp {name!r}; known: {', '.join(_BY_NAME)}")
    if call.args:
      raise ConfigError(field, f"{src}: use keyword arguments, {example}")
    allowed = {f.name for f in dataclasses.fields(cls) if f.repr}
    kwargs = {}
    for kw in call.keywords:
      if kw.arg not in allowed:
        raise ConfigError(field, f"{name}: unknown argument {kw.arg!r}; "
                          f"allowed: {', '.join(sorted(allowed))}")
      try:
        kwargs[kw.arg] = _literal(kw.value)
      except ValueError as e:
        raise ConfigError(field, f"{name}: bad value for {kw.arg}: {e}") from e
    try:
      out.append(cls(**kwargs))
    except TypeError as e:
      missing = [f.name for f in dataclasses.fields(cls) if f.repr and f.name not in kwargs
                 and f.default is dataclasses.MISSING]
      raise ConfigError(field, f"{name}: missing argument(s) {missing}") from e
    except ValueError as e:
      raise ConfigError(field, f"{name}: {e}") from e
  return tuple(out)


def _literal(node):
  if isinstance(node, ast.Name):
    return {"true": True, "false": False, "none": None}.get(node.id.lower(), node.id)
  if isinstance(node, (ast.List, ast.Tuple)):
    return [_literal(e) for e in node.elts]
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
    v = _literal(node.operand)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      return -v
  if isinstance(node, ast.Constant) and (node.value is None or
                                         isinstance(node.value, (int, float, str, bool))):
    return node.value
  raise ValueError(f"{ast.dump(node)} is not a literal (numbers, strings, lists, true/false)")


def render(clamps: Sequence[ClampSpec]) -> str:
  """The config form of a list of clamps ('' for none); `parse(render(x))` gives x."""
  return " + ".join(c.render() for c in clamps)


CONDITIONS = ("none", "prev_token", "layer1", "match", "copy", "layer1_copy")
"""The paper's sub-circuit conditions (Fig. 5b), `clamp.condition`:

  none         nothing beyond `clamp.keep_head`.
  prev_token   first layer, head 0: fixed previous-token pattern of strength
               `clamp.strength` (the paper fixed one first-layer head).
  layer1       `Layer1Clamp`: the first layer is a perfect previous-token
               layer and adds nothing else, so only the second layer learns.
  match        the kept last-layer head's query pattern is the perfect
               induction (match) pattern of strength `clamp.strength`
               (`InductionPattern`, as the paper's code): only its copy
               (OV) path and the rest learn.
  copy         `CopyFromHead` on the kept head: the logits are its scores, so
               only the match (QK) path, and the first layer, learn.
  layer1_copy  layer1 + copy: only the second layer's QK match learns.
match, copy and layer1_copy need `clamp.keep_head` >= 0; layer1 and
layer1_copy need a 2-layer model.
"""


def keep_head_clamps(spec, keep_head: int) -> tuple[ClampSpec, ...]:
  """`clamp.keep_head`: ablate the values of every last-layer head but `keep_head`."""
  if keep_head < 0:
    return ()
  others = tuple(h for h in range(spec.num_heads) if h != keep_head)
  return (AblateHeads(layer=spec.num_layers - 1, heads=others),) if others else ()


def condition_clamps(spec, condition: str, keep_head: int, strength: float) -> tuple[ClampSpec, ...]:
  """The clamps of a sub-circuit condition (see CONDITIONS)."""
  last = spec.num_layers - 1
  if condition == "none":
    return ()
  if condition == "prev_token":
    return (PrevTokenPattern(layer=0, heads=(0,), strength=strength),)
  layer1 = (Layer1Clamp(),) if condition.startswith("layer1") else ()
  copy = (CopyFromHead(head=keep_head, layer=last),) if condition.endswith("copy") else ()
  if condition == "match":
    return (InductionPattern(layer=last, heads=(keep_head,), strength=strength),)
  return layer1 + copy


def _run_clamps(cfg, settings: dict, spec, load: bool) -> tuple[tuple[ClampSpec, ...], list[str]]:
  """One run's resolved clamps and the config field each came from."""
  get = lambda f, default: settings.get(f, default)
  keep = get("clamp.keep_head", cfg.clamp.keep_head)
  cond = get("clamp.condition", cfg.clamp.condition)
  strength = get("clamp.strength", cfg.clamp.strength)
  if isinstance(keep, bool) or not isinstance(keep, int) or not -1 <= keep < spec.num_heads:
    raise ConfigError("clamp.keep_head", f"must be -1 (off) or a last-layer head in "
                      f"[0, {spec.num_heads}), got {keep!r}")
  if cond not in CONDITIONS:
    raise ConfigError("clamp.condition", f"must be one of {CONDITIONS}, got {cond!r}")
  if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
    raise ConfigError("clamp.strength", f"must be in [0, 1], got {strength!r}")
  if cond in ("match", "copy", "layer1_copy") and keep < 0:
    raise ConfigError("clamp.condition", f"condition {cond!r} acts on the one active "
                      "last-layer head: set clamp.keep_head >= 0")
  if cond.startswith("layer1") and spec.num_layers != 2:
    raise ConfigError("clamp.condition", f"condition {cond!r} is the paper's 2-layer "
                      f"circuit (model.num_layers={spec.num_layers})")
  parts = [(c, "clamps") for c in resolve(spec, parse(get("clamps", cfg.clamps), "clamps"),
                                          "clamps", load)]
  parts += [(c, "clamp.keep_head") for c in resolve(spec, keep_head_clamps(spec, keep),
                                                    "clamp.keep_head", load)]
  parts += [(c, "clamp.condition") for c in resolve(spec, condition_clamps(spec, cond, keep,
                                                                           float(strength)),
                                                    "clamp.condition", load)]
  clamps, fields = tuple(c for c, _ in parts), [f for _, f in parts]
  check_conflicts(spec, clamps, fields)
  return clamps, fields


def _model_spec(cfg):
  from icldyn import train as train_lib
  return train_lib.build_static(cfg).model


def eval_clamp_names(cfg) -> list[str]:
  """The names in `eval.clamps`, in order."""
  names = [n.strip() for n in str(cfg.eval.clamps).split(",") if n.strip()]
  dup = [n for i, n in enumerate(names) if n in names[:i]]
  if dup:
    raise ConfigError("eval.clamps", f"{dup[0]!r} is listed twice")
  return names


def plans_for_group(cfg, settings: list[dict]):
  """The training plan, per-run clamp params and named evaluation plans of a group.

  Args:
    cfg: the group's config.
    settings: per-run flat settings (with 'clamp.*' fields, and 'clamps' when
      it is a grid field).

  Returns:
    (plan or None, stacked per-run params or None, tuple of (name, plan)).
  """
  spec = _model_spec(cfg)
  eval_plans = tuple((n, named_plan(n, spec)) for n in eval_clamp_names(cfg))
  runs = [_run_clamps(cfg, s, spec, load=True)[0] for s in settings]
  plan, params = _build_resolved(spec, runs)
  return plan, params, eval_plans


def validate(cfg) -> None:
  """Checks one run's clamp fields (`clamps`, `clamp.*`, `eval.clamps`) without
  loading graft donors; raises ConfigError naming the field."""
  spec = _model_spec(cfg)
  _run_clamps(cfg, {}, spec, load=False)
  for n in eval_clamp_names(cfg):
    named_plan(n, spec)


_NAMED = (
    (r"unclamped", "no clamp (a run trained with clamps, evaluated without)"),
    (r"keep_head_(\d+)", "only last-layer head h kept (the others' values ablated)"),
    (r"ablate_head_(\d+)_(\d+)", "head h of layer l ablated"),
    (r"ablate_layer_(\d+)", "every head of layer l ablated"),
    (r"preserve_pattern_ablate_v_(\d+)",
     "layer l's values ablated, every layer's patterns preserved from an unclamped pass"),
)


def named_clamps(name: str, spec) -> tuple[ClampSpec, ...]:
  """The clamps of a named evaluation clamp (see `named_plan`)."""
  for pattern, _ in _NAMED:
    m = re.fullmatch(pattern, name)
    if not m:
      continue
    n = [int(g) for g in m.groups()]
    if pattern.startswith("keep_head"):
      if not 0 <= n[0] < spec.num_heads:
        raise ConfigError("eval.clamps", f"{name}: head {n[0]} out of range "
                          f"(model.num_heads={spec.num_heads})")
      return keep_head_clamps(spec, n[0])
    if pattern.startswith("ablate_head"):
      return (AblateHeads(layer=n[0], heads=(n[1],)),)
    if pattern.startswith("ablate_layer"):
      return (AblateHeads(layer=n[0]),)
    if pattern.startswith("preserve"):
      return (Preserve(what=("pattern",)), AblateHeads(layer=n[0]))
    return ()
  known = "; ".join(p.replace(r"(\d+)", "N") + f": {d}" for p, d in _NAMED)
  raise ConfigError("eval.clamps", f"unknown named clamp {name!r}; known: {known}")


def named_plan(name: str, spec) -> Plan:
  """A plan with constant clamps by name, for `eval.clamps` and checkpoint analysis.

  Names: `unclamped`, `keep_head_{h}` (only last-layer head h kept),
  `ablate_head_{l}_{h}`, `ablate_layer_{l}`, `preserve_pattern_ablate_v_{l}`
  (layer l's values ablated, patterns of every layer preserved from an
  unclamped first pass). The plan ignores the run's training clamps:
  `plan.forward(spec, params, batch, num_labels, None)`.

  Raises:
    ConfigError('eval.clamps', ...): unknown name or out-of-range index.
  """
  return fixed_plan(spec, named_clamps(name, spec), "eval.clamps")


def describe(settings: dict) -> dict:
  """Readable clamp columns of one run for runs.csv:
  {'clamps': 'keep_head(3)+condition(match,s=1.0)+<the clamps field>'} or 'none'."""
  parts = []
  if settings.get("clamp.keep_head", -1) >= 0:
    parts.append(f"keep_head({settings['clamp.keep_head']})")
  cond = settings.get("clamp.condition", "none")
  if cond in ("prev_token", "match"):
    parts.append(f"condition({cond},s={float(settings.get('clamp.strength', 1.0))!r})")
  elif cond != "none":
    parts.append(f"condition({cond})")
  text = settings.get("clamps") or ""
  if text:
    try:
      parts.append(render(parse(text)))
    except ConfigError:
      parts.append(text)
  return {"clamps": "+".join(parts) or "none"}
