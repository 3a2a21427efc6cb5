"""The clamp mechanism: a value and a mask at a node of the activation tree.

A clamp tree mirrors the model's activation tree (docs/interfaces.md) on any
subset of its nodes. Each leaf is a `Clamp(value, mask)`; the model applies
`where(mask, value, computed)` right where the activation is made, so
downstream computation uses the clamped value and no gradient reaches the
computed value through clamped entries (Singh et al. 2024, arXiv 2404.07129,
after the `cache`/`cache_mask` pair of their code). Masks are arrays, so runs
of one compiled grid can clamp different entries. The catalogue of named
interventions built on this lives in `icldyn.clamps`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


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
