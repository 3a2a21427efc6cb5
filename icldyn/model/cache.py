"""The activation cache: every intermediate of a forward pass under one flat name.

`model.apply` returns its activations as a nested tree (docs/interfaces.md);
`Cache` indexes the same arrays by slash-joined names, the way researchers
address them (`cache["layer_1/attn/pattern"]`, TransformerLens's
`cache["pattern", 1]`), and adds the helpers analysis reaches for: one
site stacked over layers, each head's write into the residual stream, and
the residual stream split into the components that add up to it.

Names and shapes for one run (`B` sequences, `T` positions, `H` heads,
`dh = d_model / H`, `d = d_model`, `R` read-out rows, `L` outputs):

| name | shape |
|---|---|
| `embed` | `[B, T, d]` |
| `layer_{l}/resid_pre` | `[B, T, d]` |
| `layer_{l}/attn/q`, `/k`, `/v` | `[B, T, H, dh]` |
| `layer_{l}/attn/scores` | `[B, H, T, T]` |
| `layer_{l}/attn/pattern` | `[B, H, T, T]` (query, key) |
| `layer_{l}/attn/z` | `[B, T, H, dh]` |
| `layer_{l}/attn/out` | `[B, T, d]` |
| `layer_{l}/mlp_out` | `[B, T, d]` (only with `model.mlp_ratio`) |
| `layer_{l}/resid_post` | `[B, T, d]` |
| `resid_final` | `[B, T, d]` (after the final LayerNorm, if any) |
| `logits` | `[B, R, L]` |

A whole-grid cache has a leading run axis `[N, ...]` on every array; the
helpers index from the right, so they work on both. A Cache is a pytree
(names are static), so it passes through `jit` and `vmap`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp


def act_name(layer: int | None, site: str) -> str:
  """The cache name of `site` in `layer` (`act_name(1, "attn/pattern")` is
  `"layer_1/attn/pattern"`); `layer=None` for the model-level sites
  (`embed`, `resid_final`, `logits`)."""
  return site if layer is None else f"layer_{layer}/{site}"


def flatten_acts(acts: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """The nested activation tree of `model.apply` as `{name: array}`."""
  out: dict[str, Any] = {}
  for key, node in acts.items():
    name = f"{prefix}{key}"
    if isinstance(node, Mapping):
      out.update(flatten_acts(node, name + "/"))
    else:
      out[name] = node
  return out


def keep_names(names: Iterable[str], keep: Iterable[str] | None) -> list[str]:
  """The names among `names` that `keep` selects: an entry selects every name
  that contains it as whole path segments (`"layer_1"` keeps all of layer 1,
  `"attn/pattern"` the pattern of every layer, `"logits"` the logits). None
  keeps all.

  Raises:
    KeyError: an entry selects nothing (with the names there are).
  """
  names = list(names)
  if keep is None:
    return names
  out = []
  for k in keep:
    k = k.strip("/")
    hit = [n for n in names if f"/{k}/" in f"/{n}/"]  # whole path segments only
    if not hit:
      raise KeyError(f"no activation {k!r}; the cache has: {', '.join(names)}")
    out += [n for n in hit if n not in out]
  return [n for n in names if n in out]


@jax.tree_util.register_pytree_node_class
class Cache:
  """Activations of a forward pass, by name (see the module docstring)."""

  def __init__(self, arrays: Mapping[str, Any]):
    self.arrays = dict(arrays)

  @classmethod
  def from_acts(cls, acts: Mapping[str, Any], keep: Iterable[str] | None = None) -> "Cache":
    """A cache of `model.apply`'s activation tree, keeping only `keep` (see `keep_names`)."""
    flat = flatten_acts(acts)
    return cls({n: flat[n] for n in keep_names(flat, keep)})

  # -- pytree

  def tree_flatten(self):
    names = tuple(self.arrays)
    return tuple(self.arrays[n] for n in names), names

  @classmethod
  def tree_unflatten(cls, names, leaves):
    return cls(dict(zip(names, leaves)))

  # -- lookup

  def __getitem__(self, name: str) -> jax.Array:
    try:
      return self.arrays[name]
    except KeyError:
      raise KeyError(f"no activation {name!r} in this cache; it has: "
                     f"{', '.join(self.arrays)}") from None

  def __contains__(self, name: object) -> bool:
    return name in self.arrays

  def __iter__(self):
    return iter(self.arrays)

  def __len__(self) -> int:
    return len(self.arrays)

  def names(self) -> list[str]:
    """Every name in the cache, in the model's order."""
    return list(self.arrays)

  def keep(self, names: Iterable[str]) -> "Cache":
    """A cache with only the selected names (see `keep_names`)."""
    return Cache({n: self.arrays[n] for n in keep_names(self.arrays, names)})

  def __repr__(self) -> str:
    shapes = ", ".join(f"{n}: {tuple(getattr(a, 'shape', ()))}" for n, a in self.arrays.items())
    return f"Cache({shapes})"

  # -- helpers

  @property
  def num_layers(self) -> int:
    """Layers the cache has activations of."""
    layers = {n.split("/")[0] for n in self.arrays if n.startswith("layer_")}
    return len(layers)

  def stack(self, site: str) -> jax.Array:
    """`site` of every layer stacked on a new axis before the batch axis:
    `stack("attn/pattern")` is `[L_layers, B, H, T, T]` (`[N, L_layers, ...]`
    for a whole-grid cache)."""
    names = [act_name(l, site) for l in range(self.num_layers)]
    missing = [n for n in names if n not in self.arrays]
    if missing:
      raise KeyError(f"no activation {missing[0]!r} in this cache")
    arrays = [self.arrays[n] for n in names]
    axis = arrays[0].ndim - _site_rank(site)
    return jnp.stack(arrays, axis=axis)

  def head_outputs(self, params: Mapping[str, Any], layer: int) -> jax.Array:
    """Each head's write into the residual stream, `z_h @ w_o[h]`.

    Args:
      params: the run's parameters (with a leading run axis for a whole-grid cache).
      layer: the layer.

    Returns:
      `[..., B, T, H, d]`; summed over heads it is `layer_{layer}/attn/out`.
    """
    z = self[act_name(layer, "attn/z")]  # [..., B, T, H, dh]
    w_o = jnp.asarray(params[f"layer_{layer}"]["attn"]["w_o"])  # [..., H, dh, d]
    if w_o.ndim == 3:
      return jnp.einsum("...thk,hkd->...thd", z, w_o)
    return jnp.einsum("n...thk,nhkd->n...thd", z, w_o)

  def resid_components(self, params: Mapping[str, Any] | None = None
                       ) -> tuple[list[str], jax.Array]:
    """The residual stream before the final LayerNorm, split into what wrote it.

    Args:
      params: if given, attention is split per head (`layer_{l}/attn/head_{h}`,
        from `head_outputs`); otherwise one component per layer's attention.

    Returns:
      (labels, components `[C, ..., B, T, d]`): `embed`, then per layer its
      attention (or heads) and `mlp_out` if present. Their sum is the last
      layer's `resid_post` (up to float rounding; a clamped residual stream
      breaks the identity).
    """
    labels, parts = ["embed"], [self["embed"]]
    for l in range(self.num_layers):
      if params is None:
        labels.append(act_name(l, "attn/out"))
        parts.append(self[act_name(l, "attn/out")])
      else:
        heads = self.head_outputs(params, l)
        for h in range(heads.shape[-2]):
          labels.append(act_name(l, f"attn/head_{h}"))
          parts.append(heads[..., h, :])
      if act_name(l, "mlp_out") in self:
        labels.append(act_name(l, "mlp_out"))
        parts.append(self[act_name(l, "mlp_out")])
    return labels, jnp.stack(parts)


def _site_rank(site: str) -> int:
  """Rank of one run's activation at `site` (for stacking before its batch axis)."""
  return 4 if site.split("/")[-1] in ("q", "k", "v", "scores", "pattern", "z") else 3
