"""Progress measures of checkpoints: one compiled program per group, vmapped over runs.

This module owns what `icldyn analyze` computes from a checkpoint: which
measures exist, the jitted function that evaluates them for every run of a
group at one checkpoint, and the long-format row keys (`measure, layer,
head, layer2, head2`) of every number it returns (docs/interfaces.md,
`analysis/progress.csv`).

Measures (`--measures` names; rows of progress.csv):

| name | progress.csv measure | layer,head | layer2,head2 |
|---|---|---|---|
| `induction_strength` | the task's `induction_metric` (few-shot `induction_strength`, tokens `prefix_matching`) | last layer, each head | |
| `prev_token` | `prev_token` | first layer, each head | |
| `loss` | `loss`, `acc` | | |
| `clamped` | `loss@{clamp}`, `acc@{clamp}` | | |
| `composition` | `q_composition`, `k_composition`, `v_composition` | later head | earlier head |
| `k_composition_svd_share` | `k_composition_svd_share.c{r}` | later head | earlier head |
| `ov_copying` | `ov_copying` | last layer, each head | |

The first four are data measures: means over a fixed evaluation batch, the
first `size` sequences of the run's own evaluation set of the task's
headline evaluator (`fsl_train` for the few-shot task; the same sequences
`icldyn train` evaluates, so with `size = eval.size` they equal its
metrics). `induction_strength` and `prev_token` are the task-defined head
scores of `icldyn.tasks.scores`, the definitions training logs to
metrics.csv. The rest are weight measures from `icldyn.analysis.weights`. Composition rows cover every pair of layers
`layer2 < layer`; `c{r}` counts singular components of the earlier head's
OV circuit from the largest.

Measures and clamps are static (they key the compiled program); runs are a
leading axis of params, batch and props, and the program is reused for
every checkpoint of the group.

Cost on a 2-core CPU, paper model, 64 runs: the weight measures take about
0.05 s per checkpoint; a forward pass over 256 sequences per run about
0.3-0.5 s (tiny batched matmuls are slow there), and `clamped` needs one per
clamp. Hence the defaults: every measure but `clamped`, with the data
measures training already logs taken from metrics.csv (`LOGGED_BY_TRAIN`).

The SVD, QR and eigenvalue calls of the weight measures run on the host
through numpy (`icldyn.analysis.host_linalg`): jaxlib's batched CPU LAPACK
kernels can deadlock on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from icldyn import clamps as clamps_lib
from icldyn import model as model_lib
from icldyn import step as train_lib
from icldyn.analysis import custom as custom_lib
from icldyn.analysis import weights
from icldyn.tasks import scores

log = logging.getLogger(__name__)

DATA_MEASURES = ("induction_strength", "prev_token", "loss", "clamped")
WEIGHT_MEASURES = ("composition", "k_composition_svd_share", "ov_copying")
MEASURES = DATA_MEASURES + WEIGHT_MEASURES
# `clamped` costs one forward pass per clamp per checkpoint, so it is asked for by name.
DEFAULT_MEASURES = tuple(m for m in MEASURES if m != "clamped")
EVAL_SIZE = 256  # sequences in the analysis batch


def logged_by_train(induction_metric: str) -> dict[str, tuple[str, ...]]:
  """Data measures that `icldyn train` already logs at every evaluation of the
  headline evaluator, as metric-name prefixes (`x.h` prefixes a head):
  `analyze` reuses metrics.csv rather than recomputing them, unless asked by name."""
  return {"induction_strength": (f"{induction_metric}.h",), "prev_token": ("prev_token.h",),
          "loss": ("loss", "acc")}



class RowKey(NamedTuple):
  """The identifying columns of one progress.csv value (None = empty cell)."""
  measure: str
  layer: int | None = None
  head: int | None = None
  layer2: int | None = None
  head2: int | None = None


def default_clamps(spec) -> tuple[str, ...]:
  """Named clamps (`icldyn.clamps.named_plan`) of the `clamped` measure.

  Each last-layer head kept alone (`keep_head_{h}`), and, with two or more
  layers, the first layer's values ablated with every pattern preserved
  from an unclamped pass (`preserve_pattern_ablate_v_0`).
  """
  names = tuple(f"keep_head_{h}" for h in range(spec.num_heads))
  return names + (("preserve_pattern_ablate_v_0",) if spec.num_layers >= 2 else ())


# --------------------------------------------------------------------------
# Array-level measures of one run (jax.numpy; vmap over runs).


def induction_strength(pattern: jax.Array, targets) -> jax.Array:
  """Mean induction score of each head over a batch, every induction row weighing the same.

  Args:
    pattern: [B, H, T, T] attention pattern of a layer.
    targets: the batch's `icldyn.tasks.base.Targets`.

  Returns:
    [H]; see `icldyn.tasks.scores`.
  """
  sums, counts = scores.induction_rows(pattern, targets)
  return jnp.sum(sums, axis=0) / jnp.sum(counts)


def prev_token(pattern: jax.Array, layout) -> jax.Array:
  """Mean chance-corrected previous-token score of each head over a batch.

  Args:
    pattern: [B, H, T, T].
    layout: the task's `icldyn.tasks.base.Layout`.

  Returns:
    [H]; see `icldyn.tasks.scores`.
  """
  return jnp.mean(scores.prev_token(pattern, layout), axis=0)


def ov_copying(params, spec, num_outputs: jax.Array) -> jax.Array:
  """Last-layer OV copying score of each head over the run's own outputs.

  `weights.ov_copying_score` over the outputs the run has (its front end's
  `output_mask`), with the output count a traced per-run value: rows of the
  output embedding and columns of the unembedding it does not have are
  zeroed, which only adds zero eigenvalues to each head's map and leaves the
  score unchanged.

  Args:
    params: one run's params.
    spec: the ModelSpec (its front end names the output embedding).
    num_outputs: [] int, the run's output count.

  Returns:
    [H].
  """
  module, name = spec.front.output_embedding
  keep = spec.front.output_mask(num_outputs)
  masked = dict(params)
  masked[module] = {name: jnp.where(keep[:, None], params[module][name], 0.0)}
  masked["unembed"] = dict(params["unembed"],
                           kernel=jnp.where(keep[None, :], params["unembed"]["kernel"], 0.0))
  return weights.ov_copying_score(masked, layer=-1, embedding=(module, name))


# --------------------------------------------------------------------------
# The program of a group.


@dataclasses.dataclass(frozen=True)
class Program:
  """A group's compiled measure function and the row keys of its outputs.

  Attributes:
    fn: `fn(params, batch, props) -> {key: [R, ...]}` (params and props
      with a leading run axis, batch [R, B, ...] or None); one jitted program,
      compiled on the first call.
    layout: `{key: [RowKey, ...]}` aligned with each output's trailing
      axes, flattened in C order.
    measures: the measures computed.
    clamps: named clamps of the `clamped` measure.
    needs_batch: whether fn reads the evaluation batch.
  """
  fn: Callable
  layout: dict[str, list[RowKey]]
  measures: tuple[str, ...]
  clamps: tuple[str, ...]
  needs_batch: bool


def layer_pairs(num_layers: int) -> list[tuple[int, int]]:
  """Every (earlier, later) pair of layers."""
  return [(e, l) for l in range(num_layers) for e in range(l)]


def make_layout(spec, measures: Sequence[str], clamps: Sequence[str],
                induction_metric: str = "induction_strength",
                custom_shapes: dict[str, tuple[custom_lib.Measure, tuple[int, ...]]] | None = None
                ) -> dict[str, list[RowKey]]:
  """Row keys of every output of `run_measures`, in its key order (the
  induction score's rows are named after the task's `induction_metric`;
  `custom_shapes`: {output key: (custom measure, shape of one run's value)})."""
  nl, h, dh = spec.num_layers, spec.num_heads, spec.d_head
  out: dict[str, list[RowKey]] = {}
  if "induction_strength" in measures:
    out["induction_strength"] = [RowKey(induction_metric, nl - 1, i) for i in range(h)]
  if "prev_token" in measures:
    out["prev_token"] = [RowKey("prev_token", 0, i) for i in range(h)]
  if "loss" in measures:
    out["loss"], out["acc"] = [RowKey("loss")], [RowKey("acc")]
  if "clamped" in measures:
    for c in clamps:
      out[f"loss@{c}"], out[f"acc@{c}"] = [RowKey(f"loss@{c}")], [RowKey(f"acc@{c}")]
  for e, l in layer_pairs(nl):
    pairs = [(j, i) for j in range(h) for i in range(h)]
    if "composition" in measures:
      for kind in "qkv":
        out[f"{kind}_composition/{e}/{l}"] = [RowKey(f"{kind}_composition", l, j, e, i)
                                              for j, i in pairs]
    if "k_composition_svd_share" in measures:
      out[f"k_composition_svd_share/{e}/{l}"] = [
          RowKey(f"k_composition_svd_share.c{r}", l, j, e, i) for j, i in pairs for r in range(dh)]
  if "ov_copying" in measures:
    out["ov_copying"] = [RowKey("ov_copying", nl - 1, i) for i in range(h)]
  for key, (m, shape) in (custom_shapes or {}).items():
    name = key.split("/", 2)[2]
    out[key] = [RowKey(*k) for k in custom_lib.row_keys(m, name, shape, nl, h)]
  return out


def run_measures(static: train_lib.Static, params, batch,
                 props: train_lib.Props, measures: Sequence[str],
                 plans: Sequence[tuple[str, Any]] = (),
                 custom: Sequence[custom_lib.Measure] = ()) -> dict[str, jax.Array]:
  """Every requested measure of one run at one checkpoint.

  Args:
    static: the group's static spec (its training clamp plan, if any, is
      applied to the unclamped forward pass, as in evaluation).
    params: one run's params.
    batch: one run's evaluation batch ([B, ...] fields), or None when no
      data measure is asked for.
    props: one run's props.
    measures: names from MEASURES.
    plans: (name, plan) of the `clamped` measure.
    custom: users' measures (`icldyn.analysis.custom`); their outputs are
      keyed `custom/{measure}/{name}`.

  Returns:
    {key: array}, keys and shapes as `make_layout`.
  """
  spec = static.model
  out = {}
  evaluator = analysis_evaluator(static)

  def loss_acc(logits, acts):
    result = static.task.reduce(evaluator, static.task.eval_terms(evaluator, logits, acts, batch))
    return result["loss"], result["acc"]

  if any(m in measures for m in ("induction_strength", "prev_token", "loss")) or custom:
    logits, acts = train_lib.forward(static, params, batch, props, static.plan)
    if custom:
      cache = model_lib.Cache.from_acts(acts)
      for m in custom:
        for name, value in m(params, cache, batch).items():
          out[f"custom/{m.name}/{name}"] = value
    if "induction_strength" in measures:
      out["induction_strength"] = induction_strength(
          acts[f"layer_{spec.num_layers - 1}"]["attn"]["pattern"], spec.front.targets(batch))
    if "prev_token" in measures:
      out["prev_token"] = prev_token(acts["layer_0"]["attn"]["pattern"], spec.front.layout)
    if "loss" in measures:
      out["loss"], out["acc"] = loss_acc(logits, acts)
  if "clamped" in measures:
    for name, plan in plans:
      logits, acts = plan.forward(spec, params, batch, props.data.num_outputs, props.clamp)
      out[f"loss@{name}"], out[f"acc@{name}"] = loss_acc(logits, acts)
  pairs = layer_pairs(spec.num_layers)
  if "composition" in measures:
    for e, l in pairs:
      scores = weights.composition_scores(params, layers=(e, l))
      for kind in "qkv":
        out[f"{kind}_composition/{e}/{l}"] = scores[kind]
  if "k_composition_svd_share" in measures and pairs:
    early = sorted({e for e, _ in pairs})
    s, dirs = weights.ov_directions(params, early)
    for e, l in pairs:
      i = early.index(e)
      out[f"k_composition_svd_share/{e}/{l}"] = weights.shares_from_directions(
          s[i], dirs[i], params[f"layer_{l}"]["attn"])
  if "ov_copying" in measures:
    out["ov_copying"] = ov_copying(params, spec, props.data.num_outputs)
  return out


def clamp_plans(spec, names: Sequence[str]) -> tuple[tuple[str, Any], ...]:
  """(name, plan) for each named clamp; empty when icldyn.clamps has no catalogue.

  Raises:
    ConfigError: an unknown name (from `clamps.named_plan`).
  """
  named_plan = getattr(clamps_lib, "named_plan", None)
  if named_plan is None:
    log.warning("measure 'clamped' skipped: icldyn.clamps has no named_plan yet")
    return ()
  return tuple((n, named_plan(n, spec)) for n in names)


def make_program(static: train_lib.Static, measures: Sequence[str],
                 clamps: Sequence[str] | None = None, chunk: int | None = None,
                 custom: Sequence[custom_lib.Measure] = (), table=None,
                 props: train_lib.Props | None = None) -> Program:
  """The group's measure program (compiled on first call, then reused).

  Args:
    static: the group's static spec.
    measures: names from MEASURES.
    clamps: named clamps of the `clamped` measure (default: `default_clamps`).
    chunk: runs evaluated together in the data measures (0: all runs in
      one vmap; None: 8 on a CPU, else 0). A `lax.map` over chunks of a few
      runs is about twice as fast on a CPU, where many tiny batched matmuls
      are slow; results do not depend on it.
    custom: users' measures (`icldyn.analysis.custom`).
    table, props: the group's shared arrays and stacked props (needed with
      `custom`, to find the shapes of their outputs).

  Returns:
    A Program.
  """
  unknown = [m for m in measures if m not in MEASURES]
  if unknown:
    raise ValueError(f"unknown measures {unknown}; known: {', '.join(MEASURES)}")
  spec = static.model
  measures = tuple(m for m in MEASURES if m in measures)
  if spec.num_layers < 2:
    dropped = [m for m in measures if m in ("composition", "k_composition_svd_share")]
    if dropped:
      log.warning("measures %s skipped: the model has one layer", ", ".join(dropped))
    measures = tuple(m for m in measures if m not in dropped)
  names = tuple(clamps) if clamps is not None else default_clamps(spec)
  plans = clamp_plans(spec, names) if "clamped" in measures else ()
  if "clamped" in measures and not plans:
    measures = tuple(m for m in measures if m != "clamped")
  names = tuple(n for n, _ in plans)
  custom = tuple(custom)
  needs_batch = any(m in DATA_MEASURES for m in measures) or bool(custom)
  if chunk is None:
    chunk = 8 if jax.default_backend() == "cpu" else 0

  def one(params, batch, props):
    return run_measures(static, params, batch, props, measures, plans, custom)

  shapes = custom_shapes(static, custom, table, props, one) if custom else None

  def fn(params, batch, props):
    if not chunk:
      return jax.vmap(one)(params, batch, props)
    return jax.lax.map(lambda a: one(*a), (params, batch, props), batch_size=chunk)

  layout = make_layout(spec, measures, names, static.task.induction_metric, shapes)
  return Program(fn=jax.jit(fn), layout=layout, measures=measures + tuple(m.name for m in custom),
                 clamps=names, needs_batch=needs_batch)


def custom_shapes(static: train_lib.Static, custom: Sequence[custom_lib.Measure], table,
                  props: train_lib.Props, one: Callable
                  ) -> dict[str, tuple[custom_lib.Measure, tuple[int, ...]]]:
  """{output key: (measure, shape)} of the custom measures' outputs for one run (traced, not run)."""
  if props is None:
    raise ValueError("custom measures need the group's table and props to be shaped")
  first = jax.tree.map(lambda x: x[0], props)
  evaluator = analysis_evaluator(static)
  batch = jax.eval_shape(lambda t, p: static.task.sample(
      train_lib.eval_key(static, p.eval_seed, evaluator), t, p.data, evaluator, EVAL_SIZE),
      table, first)
  params = jax.eval_shape(lambda: model_lib.init_params(static.model, 0))
  out = jax.eval_shape(one, params, batch, first)
  by_name = {m.name: m for m in custom}
  return {k: (by_name[k.split("/")[1]], tuple(v.shape)) for k, v in out.items()
          if k.startswith("custom/")}


# --------------------------------------------------------------------------
# The evaluation batch.


def analysis_evaluator(static: train_lib.Static) -> str:
  """The evaluator whose evaluation set the data measures read: the task's
  headline evaluator (`fsl_train` for the few-shot task)."""
  return static.task.analysis_evaluator


def eval_batch(static: train_lib.Static, table, props: train_lib.Props, size: int = EVAL_SIZE):
  """Each run's analysis batch: the first `size` sequences of its evaluation set
  of `analysis_evaluator`.

  Sequence i of an evaluator's set uses `fold_in(key, i)` with the key
  `step.eval_key` derives from the run's eval seed, so this batch is a
  prefix of the set that training evaluates.

  Args:
    static: the group's static spec.
    table: the group's shared arrays.
    props: stacked props [R, ...].
    size: sequences per run.

  Returns:
    The task's batch with fields [R, size, ...] (numpy).
  """
  evaluator = analysis_evaluator(static)

  def one(data_props, eval_seed, table):
    key = train_lib.eval_key(static, eval_seed, evaluator)
    return static.task.sample(key, table, data_props, evaluator, size)

  return jax.device_get(jax.jit(jax.vmap(one, (0, 0, None)))(props.data, props.eval_seed, table))


def rows_per_run(layout: dict[str, list[RowKey]]) -> int:
  """progress.csv rows per run and checkpoint."""
  return sum(len(v) for v in layout.values())


def flatten(out: dict[str, np.ndarray], layout: dict[str, list[RowKey]]) -> np.ndarray:
  """Host outputs {key: [R, ...]} → [R, rows_per_run] in layout order."""
  cols = [np.asarray(out[k]).reshape(np.shape(out[k])[0], -1) for k in layout]
  return np.concatenate(cols, axis=1) if cols else np.zeros((0, 0), np.float32)
