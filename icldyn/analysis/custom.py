"""Users' own progress measures, computed like the built-in ones over every run and checkpoint.

A custom measure is a function `fn(params, cache, batch) -> {name: array}`
(or one array, named after the function) of one run: `params` its
parameters at a checkpoint, `cache` the activations (`icldyn.model.Cache`)
of its analysis batch under its training clamps (the forward pass the
built-in data measures use), `batch` that batch (`[B, ...]` fields). Reduce
over the batch yourself; each returned array must be

- a scalar: one progress.csv row (`layer`, `head` empty);
- `[H]`: one row per head of the layer given by `layer=` (negative counts
  from the end);
- `[L, H]`: one row per layer and head.

`icldyn analyze` vmaps it over the runs of a group and maps it over the
checkpoint stream in the same compiled program as the built-in measures;
its rows land in `analysis/progress.csv` under the returned names, and each
is timed (`progress/NAME`, direction and level from the `measure`
decorator) into `phase_changes.csv` and `summary.csv` unless `--curve`
says which curves to time.

Three ways to name one: `@icldyn.measure` registers a function under its
name (then `measures=["name"]` or `--measures name` once its module is
imported); `analyze(workdir, measures=[fn])` passes it directly; and
`--measures module:function` (or `module.function`) imports it.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Sequence

import jax.numpy as jnp

from icldyn.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Measure:
  """A custom measure.

  Attributes:
    name: its name (the default row name of a single returned array).
    fn: `fn(params, cache, batch) -> {name: array} | array`.
    layer: the layer of `[H]`-shaped outputs (None: none allowed).
    direction: 'up' or 'down', how its curves are timed.
    level: the threshold level of the timing.
  """
  name: str
  fn: Callable = dataclasses.field(compare=False)
  layer: int | None = None
  direction: str = "up"
  level: float = 0.5

  def __call__(self, params, cache, batch) -> dict[str, Any]:
    """The measure's outputs as `{name: float32 array}`."""
    out = self.fn(params, cache, batch)
    if not isinstance(out, dict):
      out = {self.name: out}
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


REGISTRY: dict[str, Measure] = {}


def measure(fn: Callable | None = None, *, name: str | None = None, layer: int | None = None,
            direction: str = "up", level: float = 0.5):
  """Registers a custom measure (usable as `@measure` or `@measure(layer=-1)`).

  Args:
    fn: `fn(params, cache, batch) -> {name: array} | array`.
    name: registry name (default: the function's name).
    layer: the layer of `[H]`-shaped outputs.
    direction, level: how its curves are timed ('up'/'down', threshold level).

  Returns:
    The function itself (so it can still be called directly).
  """
  if direction not in ("up", "down"):
    raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")

  def register(f: Callable) -> Callable:
    m = Measure(name or f.__name__, f, layer, direction, float(level))
    REGISTRY[m.name] = m
    f.icldyn_measure = m  # so passing the function finds its options
    return f

  return register(fn) if fn is not None else register


def is_custom(item: Any) -> bool:
  """Whether a `--measures` item names a custom measure (rather than a built-in one)."""
  return (callable(item) or isinstance(item, Measure)
          or (isinstance(item, str) and (item in REGISTRY or ":" in item or "." in item)))


def resolve(item: Any) -> Measure:
  """A Measure from a function, a Measure, a registered name or `module:function`.

  Raises:
    ConfigError('--measures', ...): nothing importable or registered there.
  """
  if isinstance(item, Measure):
    return item
  if callable(item):
    return getattr(item, "icldyn_measure", None) or Measure(getattr(item, "__name__", "custom"),
                                                            item)
  if item in REGISTRY:
    return REGISTRY[item]
  module_name, sep, attr = item.partition(":")
  if not sep:
    module_name, _, attr = item.rpartition(".")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError("--measures", f"cannot import {module_name!r} for the measure {item!r} "
                      f"({e}); is it on PYTHONPATH?") from e
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ConfigError("--measures", f"module {module_name!r} has no function {attr!r}")
  return resolve(fn)


def row_keys(m: Measure, key: str, shape: Sequence[int], num_layers: int, num_heads: int
             ) -> list[tuple[str, int | None, int | None]]:
  """(measure, layer, head) of each value of one output, in C order.

  Raises:
    ConfigError('--measures', ...): a shape the rules do not allow.
  """
  shape = tuple(shape)
  if shape == ():
    return [(key, None, None)]
  if shape == (num_heads,) and m.layer is not None:
    layer = m.layer + num_layers if m.layer < 0 else m.layer
    if not 0 <= layer < num_layers:
      raise ConfigError("--measures", f"measure {m.name}: layer {m.layer} out of range "
                        f"(the model has {num_layers})")
    return [(key, layer, h) for h in range(num_heads)]
  if shape == (num_layers, num_heads):
    return [(key, l, h) for l in range(num_layers) for h in range(num_heads)]
  raise ConfigError("--measures", f"measure {m.name}: output {key!r} has shape {shape}; return "
                    f"a scalar, [{num_heads}] heads with layer= set, or [{num_layers}, "
                    f"{num_heads}] (layer, head), reduced over the batch")
