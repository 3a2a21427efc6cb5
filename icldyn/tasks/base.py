"""The task interface: everything specific to one kind of data, behind one contract.

A task is a module in `icldyn/tasks/` with an instance of a `Task` subclass
registered in `icldyn/tasks/__init__.py`. Nothing outside `icldyn/tasks/`
branches on which task is running: the config, the grid, the training
step, the clamps, the measures and the plots all go through this interface
(docs/tasks.md explains how to add one, with `repeat_tokens` as the example).

Host side (`Task`, one instance per task):
  - its config fields: a group of the config named `Task.group` (`data` for
    the few-shot task, `tokens` for the token task), with defaults from
    `Task.fields()`, checked by `Task.validate(cfg)`;
  - which of them are per-run data (`Task.per_run_fields`: arrays on the run
    axis, no recompile) and which per-run sizes are padded to the group's
    largest value (`Task.capacity_fields`); every other field is static;
  - its evaluators (`Task.evaluators`, `Task.default_evaluators`), the
    headline curve (progress line and default timing curve) and the curves
    `icldyn analyze` times by default;
  - `Task.spec(cfg, batch_size, eval_batch)`: the group's static `TaskSpec`;
    `Task.props(settings, cfg)`: per-run props stacked on a run axis;
    `Task.shared(cfg)`: arrays every run of a group reads (replicated).

Device side (`TaskSpec`, hashable, part of the compiled program):
  - pure, jittable samplers `sample(key, shared, props, stream, size,
    first_index)` for the training stream (`stream='train'`) and for each
    evaluator; sequence i of a call uses `fold_in(key, first_index + i)`;
  - `front`: the model's front end (`icldyn.model.FrontEnd`): the input
    embedding, the read-out positions and the output mask;
  - `loss(logits, batch)`: the training loss;
  - `eval_terms` / `reduce`: each evaluator's per-sequence terms and their
    reduction to the metrics of `metrics.csv`;
  - `front.token_labels(batch)`: `[B, T]` strings naming what each position
    holds, for the attention figures;
  - `front.layout` and `front.targets(batch)`: the reference attention
    targets (`Layout`, `Targets`) that the clamps and the head scores are
    defined by.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Targets(NamedTuple):
  """Reference attention targets of a batch, per sequence (row = query position, key = key position).

  Attributes:
    induction: [B, T, T] bool, the keys an induction head attends to from each
      row (few-shot: the label tokens after exemplars of the query's class;
      tokens: the token after each earlier occurrence of the row's token).
    contrast: [B, T, T] bool, keys whose attention the induction score
      subtracts (few-shot: the other label tokens; tokens: none).
    support: [B, T, T] bool, the keys the induction and match clamps spread
      weight over (a superset of `induction`; few-shot: the label tokens;
      tokens: every key up to the row).
    rows: [B, T] bool, rows where induction is defined: the induction score
      averages over them and the induction, match and copy clamps write them
      (few-shot: the query; tokens: positions whose token occurred before).
    match_sim: [B, T, T] float32, the similarity the match clamp takes a
      softmax of over the support (few-shot: cosine of the query and the
      exemplar before each label token; tokens: 1 where the key's previous
      token equals the row's token, else 0).
    key_outputs: [B, T] int32, the output each key holds for the copy clamp
      (few-shot: the label of a label token; tokens: the key's token; -1 =
      none).
  """
  induction: jax.Array
  contrast: jax.Array
  support: jax.Array
  rows: jax.Array
  match_sim: jax.Array
  key_outputs: jax.Array


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static positions of a task's sequences (what clamps claim before tracing).

  Attributes:
    task: the task's name (for error messages).
    seq_len: T.
    readout: positions whose logits the model returns, in order (row r of
      the logits is position readout[r]).
    prev_rows: positions the previous-token score averages over (few-shot:
      the label tokens; tokens: every position but the first).
    induction_rows: every position that can be a `Targets.rows` row.
    label_positions: positions of label tokens, or None for a task without
      them (clamps with `only_labels` and `silence_non_label` need them).
    layer1_source: for the `layer1` clamp, the position whose embedding a
      perfect previous-token first layer puts at each position (itself where
      none), or None when the task has no such clamp.
  """
  task: str
  seq_len: int
  readout: tuple[int, ...]
  prev_rows: tuple[int, ...]
  induction_rows: tuple[int, ...]
  label_positions: tuple[int, ...] | None = None
  layer1_source: tuple[int, ...] | None = None


class TaskSpec:
  """The static (hashable) description of a task in one compile group.

  Subclasses are frozen dataclasses; see the module docstring for the
  contract. Attributes every subclass has:
    name: the task's name.
    front: its front end (`icldyn.model.FrontEnd`, with `layout` and
      `targets(batch)` as well).
    evaluators: the evaluators this group runs, in config order.
    head_score_evaluators: evaluators that also report per-head scores.
    analysis_evaluator: the evaluator whose evaluation set `icldyn analyze`
      reads for its data measures (it can sample it even if the group does
      not run it).
    induction_metric: the name of the per-head induction score in
      metrics.csv and progress.csv (`Task.induction_metric`).
  """
  name: str
  front: Any
  evaluators: tuple[str, ...]
  head_score_evaluators: tuple[str, ...]
  analysis_evaluator: str
  induction_metric: str

  def sample(self, key: jax.Array, shared: Any, props: Any, stream: str, size: int,
             first_index: int | jax.Array = 0) -> Any:
    raise NotImplementedError

  def loss(self, logits: jax.Array, batch: Any) -> jax.Array:
    raise NotImplementedError

  def eval_terms(self, evaluator: str, logits: jax.Array, acts: dict, batch: Any
                 ) -> dict[str, jax.Array]:
    raise NotImplementedError

  def reduce(self, evaluator: str, terms: dict[str, jax.Array]) -> dict[str, jax.Array]:
    raise NotImplementedError

  def evaluator_index(self, evaluator: str) -> int:
    raise NotImplementedError


class Task:
  """The host-side definition of a task (one instance per task, registered by name).

  Class attributes:
    name: `task.name` in the config.
    group: the config group holding its fields.
    per_run_fields: dotted fields that are per-run data.
    capacity_fields: per-run sizes padded to the group's largest value.
    evaluators: every evaluator it has, in a fixed order (an evaluator's
      index keys its evaluation set, so the order never changes).
    default_evaluators: those `eval.evaluators=''` selects.
    headline: `EVALUATOR/METRIC` of the progress line and the default timing
      curve.
    default_curves: curves `icldyn analyze` times by default.
    induction_metric: the per-head score name the evaluators log
      (`{induction_metric}.h{h}`, last layer; `prev_token.h{h}`, first layer).
    references: horizontal reference lines of the figures, per metric.
  """
  name: ClassVar[str] = ""
  group: ClassVar[str] = ""
  per_run_fields: ClassVar[tuple[str, ...]] = ()
  capacity_fields: ClassVar[tuple[str, ...]] = ()
  evaluators: ClassVar[tuple[str, ...]] = ()
  default_evaluators: ClassVar[tuple[str, ...]] = ()
  headline: ClassVar[str] = ""
  default_curves: ClassVar[tuple[str, ...]] = ()
  induction_metric: ClassVar[str] = "induction_strength"
  references: ClassVar[dict[str, tuple[tuple[str, float], ...]]] = {}

  def facts(self) -> dict[str, Any]:
    """What the figures and the report need to know of the task, as plain data.

    `icldyn train` writes it into config.json (key `task`), so the plots,
    which never import JAX (nor, therefore, the tasks), read it from there.
    Keys: name, headline, evaluators (in order), induction_metric,
    data_axes (per-run fields, the x axes of timing plots), references
    ({metric: [[label, value], ...]}: horizontal lines on that metric's
    panels).
    """
    return {"name": self.name, "headline": self.headline, "evaluators": list(self.evaluators),
            "induction_metric": self.induction_metric, "data_axes": list(self.per_run_fields),
            "references": {m: [list(r) for r in refs] for m, refs in self.references.items()}}

  def fields(self):
    """The task's config group (an `ml_collections.ConfigDict`) with its defaults."""
    raise NotImplementedError

  def validate(self, cfg) -> None:
    """Checks the task's fields of one run's config (raises `ConfigError`)."""
    raise NotImplementedError

  def validate_evaluators(self, cfg, names: Sequence[str]) -> None:
    """Checks that each evaluator in `names` has the data it needs (raises `ConfigError`)."""

  def front(self, cfg) -> Any:
    """The model's front end (`icldyn.model.FrontEnd`) of a (capacity-padded) config."""
    raise NotImplementedError

  def spec(self, cfg, batch_size: int, eval_batch: int, evaluators: Sequence[str]) -> TaskSpec:
    """The group's static spec from its (capacity-padded) config."""
    raise NotImplementedError

  def props(self, settings: Sequence[dict], cfg) -> Any:
    """Per-run props (numpy, leading run axis) from each run's flat settings."""
    raise NotImplementedError

  def shared(self, cfg) -> Any:
    """Arrays every run of the group reads (replicated on every device)."""
    raise NotImplementedError


# --------------------------------------------------------------------------
# Helpers tasks share: padding-stable draws.


def padded_cdf(weights: np.ndarray, size: int) -> np.ndarray:
  """A float32 CDF of `weights` padded to `size` with 1.0 (cumsum in float64).

  The first entries do not change with padding, so an inverse-CDF draw of a
  run padded to a larger capacity is the draw it has alone.
  """
  w = np.asarray(weights, np.float64)
  out = np.ones(size, np.float64)
  if w.sum() > 0:
    c = np.cumsum(w) / w.sum()
    last = int(np.nonzero(w)[0][-1])
    c[last:] = 1.0  # exact 1.0 from the last supported entry on
    out[:len(c)] = c
  return out.astype(np.float32)


def zipf_cdf(num: int, alpha: float, capacity: int) -> np.ndarray:
  """CDF of p(k) proportional to (k+1)^-alpha for k < num, padded to `capacity`."""
  k = np.arange(num, dtype=np.float64)
  return padded_cdf((k + 1.0) ** -float(alpha), capacity)


def draw(cdf: jax.Array, u: jax.Array) -> jax.Array:
  """Inverse-CDF draw: the first index whose CDF exceeds u (u in [0, 1))."""
  return jnp.minimum(jnp.sum(cdf <= u), cdf.shape[0] - 1).astype(jnp.int32)


def fold_in_keys(key: jax.Array, first_index: int | jax.Array, size: int) -> jax.Array:
  """Keys `fold_in(key, first_index + i)` of sequences i < size."""
  idx = first_index + jnp.arange(size, dtype=jnp.uint32)
  return jax.vmap(jax.random.fold_in, (None, 0))(key, idx)
