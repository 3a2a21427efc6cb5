"""Clamps written in Python by a user: value and mask computed from the batch and the unclamped pass.

A custom clamp is a function `fn(ctx, **kwargs) -> clamp tree`. `ctx` is
the run's `icldyn.clamps.plan.Context`: `ctx.batch` (the task's batch,
`[B, ...]`), `ctx.cache` (the unclamped pass's activations as an
`icldyn.model.Cache`), `ctx.targets` (the task's reference attention
targets), `ctx.spec` (the `ModelSpec`; `ctx.spec.front.layout` the task's
positions) and `ctx.params`. It returns clamps at any activation sites,
either nested like the activation tree or by flat name:

    import jax.numpy as jnp
    from icldyn.model import Clamp

    def prev_token_by_hand(ctx, layer=0, head=0):
      t = ctx.spec.seq_len
      pattern = jnp.eye(t, k=-1).at[0, 0].set(1.0)       # [T, T]: attend to i - 1
      mask = jnp.zeros((1, ctx.spec.num_heads, 1, 1), bool).at[0, head].set(True)
      return {f"layer_{layer}/attn/pattern": Clamp(pattern[None, None], mask)}

`custom_clamp(fn, layer=0, head=1)` makes it a clamp like those of the
catalogue, usable in `icldyn.Run.forward(..., clamps=[...])`; in a study
file the config form names the function by its module path,
`c.clamps = "mymodule.prev_token_by_hand(layer=0, head=1)"` (the module
must be importable where training and analysis run). Keyword values are
static (numbers, strings, lists): they key the compiled program. In a grid,
runs that do not use a custom clamp have it masked off, as for any clamp.

A custom clamp claims no entries: it is not checked for conflicts with the
other clamps of a run. Where its mask overlaps another clamp's, the clamp
later in the plan's order wins (entry clamps of the catalogue sort before
custom ones).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from icldyn.clamps.catalogue import ClampSpec, Slot, render_value
from icldyn.model import Clamp, is_clamp


def function_path(fn: Callable) -> str:
  """`module.qualname` of a function, the name the config form uses."""
  return f"{fn.__module__}.{fn.__qualname__}"


def import_function(path: str) -> Callable:
  """The function at a dotted path `package.module.function`.

  Raises:
    ValueError: nothing importable there (saying what was tried).
  """
  module_name, _, attr = path.rpartition(".")
  if not module_name:
    raise ValueError(f"{path!r} is not module.function")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"cannot import module {module_name!r} for the clamp {path!r} "
                     f"({e}); is it on PYTHONPATH?") from e
  fn = module
  for part in attr.split("."):
    fn = getattr(fn, part, None)
    if fn is None:
      raise ValueError(f"module {module_name!r} has no {attr!r}")
  if not callable(fn):
    raise ValueError(f"{path!r} is not a function")
  return fn


def nest(tree: dict) -> dict:
  """A clamp tree with flat names (`"layer_0/attn/pattern"`) nested like the activations."""
  out: dict = {}
  for name, node in tree.items():
    if isinstance(node, dict):
      node = nest(node)
    parts = name.strip("/").split("/")
    at = out
    for p in parts[:-1]:
      at = at.setdefault(p, {})
    if parts[-1] in at and isinstance(at[parts[-1]], dict) and isinstance(node, dict):
      at[parts[-1]].update(node)
    else:
      at[parts[-1]] = node
  return out


def _hashable(v: Any) -> Any:
  return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True, kw_only=True)
class CustomClamp(ClampSpec):
  """A user's clamp function with its keyword arguments (see the module docstring).

  Attributes:
    function: the function's dotted path (`mymodule.my_clamp`).
    args: its keyword arguments, as sorted (name, value) pairs.
  """
  NAME: ClassVar[str] = "custom"
  function: str
  args: tuple[tuple[str, Any], ...] = ()

  def resolve(self, spec, load_donor=None):
    import_function(self.function)  # fails early, naming the function
    return self

  def slots(self):
    return (CustomSlot(function=self.function, args=self.args),)

  def fill(self, p, spec, claimed):
    p[CustomSlot(function=self.function, args=self.args).key]["on"] = np.asarray(True)

  def render(self) -> str:
    args = ", ".join(f"{k}={render_value(v)}" for k, v in self.args)
    return f"{self.function}({args})"


def custom_clamp(fn: Callable | str, **kwargs) -> CustomClamp:
  """A clamp from a function `fn(ctx, **kwargs) -> clamp tree` (or its dotted path)."""
  path = fn if isinstance(fn, str) else function_path(fn)
  return CustomClamp(function=path, args=tuple(sorted((k, _hashable(v))
                                                      for k, v in kwargs.items())))


@dataclasses.dataclass(frozen=True)
class CustomSlot(Slot):
  """The site of a custom clamp: calls the function, gated per run by `on`."""
  function: str
  args: tuple[tuple[str, Any], ...] = ()

  @property
  def key(self):
    return f"custom/{self.function}{self.args}"

  def empty(self, spec):
    return {"on": np.asarray(False)}

  def tree(self, ctx, p):
    tree = import_function(self.function)(ctx, **dict(self.args))
    if not isinstance(tree, dict):
      raise TypeError(f"the clamp {self.function} returned {type(tree).__name__}, "
                      "expected a dict of Clamp(value, mask) by activation name")
    on = jnp.asarray(p["on"])
    return jax.tree.map(lambda c: Clamp(c.value, jnp.logical_and(c.mask, on)), nest(tree),
                        is_leaf=is_clamp)
