"""Clamps: values + masks at nodes of the activation tree ("artificial optogenetics").

A clamp tree mirrors the model's activation tree (docs/interfaces.md) on any
subset of its nodes. Each leaf is a `Clamp(value, mask)`; the model applies
`where(mask, value, computed)` right where the activation is made, so
downstream computation uses the clamped value and no gradient reaches the
computed value through clamped entries (Singh et al. 2024, arXiv 2404.07129,
after the `cache`/`cache_mask` pair of their code).

Masks are arrays, so runs of a grid can carry different clamps in one
compiled program; only the set of clamped sites (the tree's structure) is
static. A site absent from the tree costs nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


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

  Where both masks are True on the same entry the clamps conflict, which is an
  error the caller checks with `conflicts` on concrete masks; here the later
  tree takes precedence entry-wise.
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


# --------------------------------------------------------------------------
# Plans: how the training step and the evaluators apply clamps.
#
# A plan is a hashable object (part of the compiled program's static spec)
# with `forward(spec, params, batch, num_labels, clamp_params) -> (logits, acts)`;
# `clamp_params` is the run's slice of a per-run pytree of arrays, so runs that
# differ only in masks or strengths share one program.


def plans_for_group(cfg, settings: list[dict]):
  """The training plan, per-run clamp params and named evaluation plans of a group.

  Args:
    cfg: the group's config.
    settings: per-run flat settings (with 'clamp.*' fields).

  Returns:
    (plan or None, stacked per-run params or None, tuple of (name, plan)).
  """
  from icldyn.config import ConfigError
  unclamped = all(s["clamp.keep_head"] < 0 and s["clamp.condition"] == "none"
                  for s in settings) and not cfg.clamps
  if unclamped and not cfg.eval.clamps:
    return None, None, ()
  raise ConfigError("clamp", "the clamp catalogue is not available yet")


def describe(settings: dict) -> dict:
  """Readable clamp columns of one run for runs.csv."""
  parts = []
  if settings.get("clamp.keep_head", -1) >= 0:
    parts.append(f"keep_head({settings['clamp.keep_head']})")
  if settings.get("clamp.condition", "none") != "none":
    parts.append(f"condition({settings['clamp.condition']})")
  return {"clamps": "+".join(parts) or "none"}
