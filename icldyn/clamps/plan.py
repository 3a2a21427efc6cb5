"""Clamp plans: which clamp sites a compiled program has, and the per-run arrays that drive them.

A list of clamps per run (`icldyn.clamps.catalogue`) becomes a *plan*: a
hashable description of the clamped sites (static, part of the compiled
program) plus a pytree of per-run arrays (which heads, how strong, on or
off). Runs of a grid that differ only in those arrays share one compiled
program; a group whose runs use different clamps uses the union of their
sites, each masked off in the runs that do not use it. A site absent from
the plan costs nothing.

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
  4. copy          the read-out's logits from a head's final scores;
  5. graft_out     the logits from a donor's later layers.
Copy and graft_out both own the logits, so they exclude each other too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import numpy as np

from icldyn import model as model_lib
from icldyn.clamps.catalogue import ClampSpec, GraftIn, Preserve, Slot, empty_claims
from icldyn.errors import ConfigError
from icldyn.model import merge


class Context:
  """One run's forward inputs, with the passes and targets clamps need computed once.

  Custom clamps (`icldyn.clamps.custom`) receive it as `ctx`.

  Attributes:
    spec: the ModelSpec.
    params: the run's parameters.
    batch: the task's batch ([B, ...], no run axis).
    num_outputs: [] the run's output count.
  """

  def __init__(self, spec, params, batch, num_outputs):
    self.spec, self.params, self.batch, self.num_outputs = spec, params, batch, num_outputs

  def run(self, clamps: dict | None, params=None):
    """`model.apply` of this batch under `clamps` (with other `params` if given)."""
    return model_lib.apply(self.spec, self.params if params is None else params, self.batch,
                           self.num_outputs, clamps)

  @functools.cached_property
  def base(self) -> dict:
    """Activations of the unclamped pass."""
    return self.run(None)[1]

  @functools.cached_property
  def cache(self) -> model_lib.Cache:
    """Activations of the unclamped pass by flat name (`icldyn.model.Cache`)."""
    return model_lib.Cache.from_acts(self.base)

  @functools.cached_property
  def targets(self):
    """The batch's reference attention targets (`icldyn.tasks.base.Targets`)."""
    return self.spec.front.targets(self.batch)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a forward pass applies clamps (hashable: part of the compiled program).

  Attributes:
    slots: the clamped sites, in order of precedence.
    fixed: for a plan with constant clamps (named evaluation plans), its
      resolved clamps; the per-run params are then built at trace time and
      `clamp_params` is ignored. None: per-run params come from `clamp_params`.
  """
  slots: tuple[Slot, ...]
  fixed: tuple[ClampSpec, ...] | None = None

  def forward(self, spec, params, batch, num_outputs, clamp_params, extra: dict | None = None):
    """Logits and activations of one run under this plan.

    Args:
      spec: the ModelSpec.
      params: the run's parameters.
      batch: the task's batch ([B, ...], no run axis).
      num_outputs: [] the run's output count.
      clamp_params: the run's slice of the per-run clamp arrays (ignored by a
        fixed plan).
      extra: a clamp tree applied under the plan's clamps (interventions on
        the clamped model, e.g. `icldyn.patching`): where both set an entry,
        the plan's clamp wins, since it is part of the model that was trained.

    Returns:
      (logits [B, R, L], acts), as `model.apply`.
    """
    p = clamp_params if self.fixed is None else run_params(self.slots, self.fixed, spec)
    ctx = Context(spec, params, batch, num_outputs)
    tree = merge(extra or {}, *(s.tree(ctx, p[s.key]) for s in self.slots))
    logits, acts = ctx.run(tree)
    for s in self.slots:
      logits, acts = s.post(ctx, p[s.key], logits, acts)
    return logits, acts


def sort_slots(slots) -> tuple[Slot, ...]:
  """Slots without repeats, in order of precedence."""
  return tuple(sorted(set(slots), key=lambda s: (s.STAGE, s.key)))


def run_params(slots, clamps: Sequence[ClampSpec], spec) -> dict:
  """Host arrays of one run: every slot's arrays, filled by the run's clamps."""
  p = {s.key: s.empty(spec) for s in slots}
  claimed = empty_claims(spec)
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
  owner = {fam: np.full(arr.shape, -1) for fam, arr in empty_claims(spec).items()}
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
            load_donor: Callable | None = None) -> tuple[ClampSpec, ...]:
  """Clamps checked against a model and its task (ConfigError naming `field` if invalid).

  Args:
    spec: the ModelSpec.
    clamps: constructors.
    field: the config field named in errors.
    load_donor: `(workdir, run, step) -> (ModelSpec, params)` for graft
      donors given by workdir (`icldyn.build.load_donor`); None checks only
      that the donor workdir exists.
  """
  out = []
  for c in clamps:
    if not isinstance(c, ClampSpec):
      raise ConfigError(field, f"not a clamp: {c!r}")
    try:
      out.append(c.resolve(spec, load_donor))
    except ConfigError:
      raise
    except ValueError as e:
      raise ConfigError(field, f"{c.render()}: {e}") from e
  return tuple(out)


def build(spec, runs: Sequence[Sequence[ClampSpec]], field: str = "clamps",
          load_donor: Callable | None = None):
  """The plan and stacked per-run arrays of a group of runs.

  Args:
    spec: the group's ModelSpec.
    runs: per run, its clamps (constructors; resolved here).
    field: config field named in errors.
    load_donor: as for `resolve`.

  Returns:
    (Plan, params with a leading run axis [R, ...]), or (None, None) when no
    run has a clamp.
  """
  resolved = [resolve(spec, r, field, load_donor) for r in runs]
  for r in resolved:
    check_conflicts(spec, r, [field] * len(r))
  return build_resolved(spec, resolved)


def build_resolved(spec, resolved: Sequence[Sequence[ClampSpec]]):
  """`build` of clamps already resolved and checked: (Plan, stacked params) or (None, None)."""
  slots = sort_slots(s for r in resolved for c in r for s in c.slots())
  if not slots:
    return None, None
  per_run = [run_params(slots, r, spec) for r in resolved]
  return Plan(slots), jax.tree.map(lambda *xs: np.stack(xs), *per_run)


def fixed_plan(spec, clamps: Sequence[ClampSpec], field: str = "eval.clamps") -> Plan:
  """A plan with constant clamps (e.g. for analysing checkpoints):
  `plan.forward(spec, params, batch, num_labels, None)`. Grafts need per-run
  params and are not allowed here."""
  resolved = resolve(spec, clamps, field)
  if any(isinstance(c, GraftIn) for c in resolved):
    raise ConfigError(field, "graft_in/graft_out need per-run donor parameters; use build()")
  check_conflicts(spec, resolved, [field] * len(resolved))
  return Plan(sort_slots(s for c in resolved for s in c.slots()), fixed=resolved)
