"""Training: loss, the pure step, the grid chunk (vmap · scan · jit), evaluation, the host loop.

The step of one run is a pure function `(state, props, step) -> state`. The
grid applies it with `jax.vmap` over the run axis (sharded over devices) and
`lax.scan` over a fixed number of steps per compiled chunk; a chunk ending at
an event (evaluation, checkpoint) masks its remaining steps with `lax.cond`
on an unbatched predicate, so one program serves every chunk length.

A run's data at step t comes from `fold_in(key(seeds.data), t)`, so the
trajectory does not depend on chunking, evaluation frequency, grid size or
the run's position in the grid.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from icldyn import checkpoint as ckpt_lib
from icldyn import config as config_lib
from icldyn import data as data_lib
from icldyn import metrics as metrics_lib
from icldyn import model as model_lib
from icldyn import sharding as sharding_lib

log = logging.getLogger(__name__)

_TRAIN_STREAM, _EVAL_STREAM = 1, 2  # fold_in tags separating the key streams


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything shape-level about a group (hashable: it keys compilation)."""
  model: model_lib.ModelSpec
  train_seq: data_lib.SeqSpec
  evals: tuple[tuple[str, data_lib.SeqSpec], ...]
  batch_size: int
  eval_size: int
  eval_batch: int
  optimizer: str
  b1: float
  b2: float
  eps: float
  scan_steps: int
  plan: Any = None  # clamp plan used in training (icldyn.clamps), or None
  eval_plans: tuple[tuple[str, Any], ...] = ()  # named clamps for evaluation
  clamp_evaluators: tuple[str, ...] = ("fsl_train",)  # evaluators also run under eval_plans


class Props(NamedTuple):
  """Per-run settings as arrays (leading run axis in a grid)."""
  init_seed: jax.Array
  data_seed: jax.Array
  eval_seed: jax.Array
  learning_rate: jax.Array
  weight_decay: jax.Array
  data: data_lib.DataProps
  clamp: Any


class TrainState(NamedTuple):
  """Per-run training state.

  Attributes:
    params: model parameters.
    opt_state: optimizer state.
    diverged: [] bool, the run hit a non-finite loss, gradient or parameter.
    diverged_step: [] int32, the optimizer step that diverged (-1 if none).
  """
  params: Any
  opt_state: Any
  diverged: jax.Array
  diverged_step: jax.Array


# --------------------------------------------------------------------------
# Pure functions of one run.


def _moments(static: Static) -> optax.GradientTransformation:
  if static.optimizer in ("adam", "adamw"):
    return optax.scale_by_adam(b1=static.b1, b2=static.b2, eps=static.eps)
  return optax.identity()


def forward(static: Static, params, batch: data_lib.Batch, props: Props, plan=None):
  """Logits and activations of one run's batch, under `plan`'s clamps if any."""
  if plan is None:
    return model_lib.apply(static.model, params, batch.inputs, batch.labels,
                           props.data.num_labels, table_rows=batch.table_rows)
  return plan.forward(static.model, params, batch, props.data.num_labels, props.clamp)


def loss_fn(params, static: Static, batch: data_lib.Batch, props: Props) -> jax.Array:
  """Mean query cross-entropy of a batch."""
  logits, _ = forward(static, params, batch, props, static.plan)
  return jnp.mean(metrics_lib.query_xent(logits[:, -1], batch.labels[:, -1]))


def init_state(static: Static, props: Props) -> TrainState:
  """Initial state of one run."""
  params = model_lib.init_params(static.model, props.init_seed)
  return TrainState(params, _moments(static).init(params), jnp.asarray(False),
                    jnp.asarray(-1, jnp.int32))


def train_batch(static: Static, table: data_lib.Table, props: Props, step) -> data_lib.Batch:
  """The training batch of optimizer step `step` (0-based)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(props.data_seed),
                                              _TRAIN_STREAM), step)
  return data_lib.sample_batch(key, table, props.data, static.train_seq, static.batch_size)


def candidate_step(static: Static, table: data_lib.Table, state: TrainState, props: Props,
                   step) -> tuple[TrainState, jax.Array, tuple[jax.Array, jax.Array]]:
  """One unguarded optimizer step of one run.

  Returns:
    (new state, ok, (loss, gradient norm)): `ok` is False when the loss, the
    gradient or the new parameters are not finite; `guard` decides what to keep.
  """
  # The named scopes only label the compiled operations (`op_name`), which
  # `icldyn.bench_profile` groups by; they change no computation.
  with jax.named_scope("sample"):
    batch = train_batch(static, table, props, step)
  loss, grads = jax.value_and_grad(loss_fn)(state.params, static, batch, props)
  with jax.named_scope("norms"):
    gnorm = optax.global_norm(grads)
  with jax.named_scope("optimizer"):
    if static.optimizer == "adam":  # coupled L2, as torch/optax `adam` + decay
      grads = jax.tree.map(lambda g, p: g + props.weight_decay * p, grads, state.params)
    updates, opt_state = _moments(static).update(grads, state.opt_state, state.params)
    if static.optimizer == "adamw":  # decoupled decay (Loshchilov & Hutter 2019)
      updates = jax.tree.map(lambda u, p: u + props.weight_decay * p, updates, state.params)
    params = jax.tree.map(lambda p, u: p - props.learning_rate * u, state.params, updates)
  with jax.named_scope("norms"):
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm) & jnp.isfinite(optax.global_norm(params))
  return (TrainState(params, opt_state, state.diverged, state.diverged_step), ok,
          (loss, gnorm))


def guard(old: TrainState, new: TrainState, ok: jax.Array, step) -> TrainState:
  """The divergence guard: a run that was or becomes non-finite keeps `old`.

  Works per run or on a whole grid (a leading run axis on every leaf and `ok`).
  """
  keep = ok & ~old.diverged
  def pick(n, o):
    k = keep.reshape(keep.shape + (1,) * (n.ndim - keep.ndim))
    return jnp.where(k, n, o)
  return TrainState(
      params=jax.tree.map(pick, new.params, old.params),
      opt_state=jax.tree.map(pick, new.opt_state, old.opt_state),
      diverged=old.diverged | ~ok,
      diverged_step=jnp.where(old.diverged | ok, old.diverged_step,
                              jnp.asarray(step, jnp.int32) + 1))


def train_step(static: Static, table: data_lib.Table, state: TrainState, props: Props,
               step) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
  """One optimizer step of one run.

  A run whose loss, gradient or new parameters are not finite keeps its last
  finite state from then on and records the step (its grid neighbours are
  unaffected, since runs share no arrays).

  Returns:
    (new state, (loss, gradient norm)).
  """
  new, ok, out = candidate_step(static, table, state, props, step)
  return guard(state, new, ok, step), out


def evaluate_run(static: Static, table: data_lib.Table, params, props: Props) -> dict:
  """All evaluators of one run on their fixed evaluation sets.

  Returns:
    {evaluator: {metric: scalar}}; evaluators under named clamps appear as
    `{evaluator}@{clamp}`. The fsl_train evaluator also reports per-head
    `induction_strength.h{h}` (last layer) and `prev_token.h{h}` (first layer).
  """
  out = {}
  n_chunks = -(-static.eval_size // static.eval_batch)
  for name, spec in static.evals:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(props.eval_seed),
                                                _EVAL_STREAM),
                             config_lib.EVALUATORS.index(name))
    extra = static.eval_plans if name in static.clamp_evaluators else ()
    for plan_name, plan in ((None, static.plan),) + extra:
      def chunk(c, plan=plan):
        batch = data_lib.sample_batch(key, table, props.data, spec, static.eval_batch,
                                      c * static.eval_batch)
        logits, acts = forward(static, params, batch, props, plan)
        terms = metrics_lib.per_sequence(logits, batch.labels)
        if name == "fsl_train":  # per-head scores are reported for fsl_train only
          last = acts[f"layer_{static.model.num_layers - 1}"]["attn"]["pattern"]
          first = acts["layer_0"]["attn"]["pattern"]
          terms["induction"] = metrics_lib.induction_strength(last, batch.classes)
          terms["prev_token"] = metrics_lib.prev_token_score(first)
        return terms
      terms = lax.map(chunk, jnp.arange(n_chunks))
      terms = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:static.eval_size], terms)
      result = metrics_lib.reduce_sequences(terms)
      if name == "fsl_train":
        for h in range(static.model.num_heads):
          result[f"induction_strength.h{h}"] = jnp.mean(terms["induction"][:, h])
          result[f"prev_token.h{h}"] = jnp.mean(terms["prev_token"][:, h])
      out[name if plan_name is None else f"{name}@{plan_name}"] = result
  return out


# --------------------------------------------------------------------------
# Grid programs.


def make_programs(static: Static, mesh) -> tuple[Callable, Callable, Callable]:
  """Compiled grid programs: init, a chunk of training steps, evaluation.

  Returns:
    init(props) -> state; chunk(state, props, table, start, n) ->
    (state, (losses [S, R], grad norms [S, R])); evaluate(state, props, table) -> metrics.
  """
  run_sharding = jax.sharding.NamedSharding(mesh, P(sharding_lib.RUN_AXIS))
  step_fn = jax.vmap(lambda st, pr, tb, t: candidate_step(static, tb, st, pr, t),
                     (0, 0, None, None))

  def grid_step(c, props, table, t):
    # The guard's select is a pass over parameters and optimizer state; when
    # every run on this device is finite (the usual case) it would pick `new`
    # everywhere, so it runs only when some run needs it. Same result bitwise.
    new, ok, out = step_fn(c, props, table, t)
    fine = jnp.all(ok & ~c.diverged)
    with jax.named_scope("guard"):
      state = lax.cond(fine, lambda n, o: n, lambda n, o: guard(o, n, ok, t), new, c)
    return state, out

  def chunk(state, props, table, start, n):
    def body(carry, i):
      def run(c):
        return grid_step(c, props, table, start + i)
      def skip(c):
        r = c.diverged.shape[0]
        return c, (jnp.zeros((r,), jnp.float32), jnp.zeros((r,), jnp.float32))
      return lax.cond(i < n, run, skip, carry)
    # unroll=2: the step's new state cannot overwrite the old one (the guard
    # may need it), so a rolled loop copies it back into the carry every step;
    # two steps per iteration let XLA alternate between two buffers instead.
    return lax.scan(body, state, jnp.arange(static.scan_steps), unroll=2)

  # Each device runs the chunk on its own runs (shard_map): runs share no
  # arrays, so nothing crosses devices. Under jit's automatic partitioning the
  # guard's `all` over the grid was a cross-device reduction every step.
  # check_vma=False: the skip branch's zeros are device-local like the rest.
  runs, shared = P(sharding_lib.RUN_AXIS), P()
  local_chunk = jax.shard_map(chunk, mesh=mesh, in_specs=(runs, runs, shared, shared, shared),
                              out_specs=(runs, P(None, sharding_lib.RUN_AXIS)), check_vma=False)

  init = jax.jit(jax.vmap(lambda pr: init_state(static, pr)), out_shardings=run_sharding)
  chunk_jit = jax.jit(local_chunk, donate_argnums=0)
  evaluate = jax.jit(jax.vmap(lambda st, pr, tb: evaluate_run(static, tb, st.params, pr),
                              (0, 0, None)))
  return init, chunk_jit, evaluate


def eval_steps(total: int, batch: int, every: int) -> list[int]:
  """Steps after which to evaluate: 0, the first step past each multiple of
  `every` sequences, and the last step."""
  steps = {0, total}
  for t in range(1, total + 1):
    if (t * batch) // every > ((t - 1) * batch) // every:
      steps.add(t)
  return sorted(steps)


# --------------------------------------------------------------------------
# Host side.


class Progress:
  """A progress line on stderr at most every `interval` seconds."""

  def __init__(self, total_seqs: int, quiet: bool, interval: float = 5.0, label: str = ""):
    self.total, self.quiet, self.interval, self.label = total_seqs, quiet, interval, label
    self.t0 = time.time()
    self.last = 0.0
    self.start_seqs = None

  def update(self, seqs: int, loss: float | None, force: bool = False) -> None:
    if self.quiet:
      return
    now = time.time()
    if self.start_seqs is None:
      self.start_seqs, self.t0 = seqs, now
      return
    if not force and now - self.last < self.interval:
      return
    self.last = now
    rate = (seqs - self.start_seqs) / max(now - self.t0, 1e-9)
    eta = max(self.total - seqs, 0) / rate if rate > 0 else float("inf")
    loss_s = f"  fsl_train loss {loss:.4f}" if loss is not None else ""
    eta_s = f"{eta:6.0f}s" if math.isfinite(eta) else "     ?"
    print(f"[icldyn]{self.label} {seqs:>10d}/{self.total} seqs  {rate:8.0f} seq/s/run  "
          f"ETA {eta_s}{loss_s}", file=sys.stderr, flush=True)


def build_static(cfg, plan=None, eval_plans=()) -> Static:
  """The static description of a group from its (capacity-padded) config."""
  m, d, t = cfg.model, cfg.data, cfg.train
  spec = model_lib.ModelSpec(
      num_layers=m.num_layers, num_heads=m.num_heads, d_model=m.d_model,
      num_labels=d.num_labels, context_len=d.context_len, input_dim=d.dim,
      pos_embedding=m.pos_embedding, layer_norm=m.layer_norm, mlp_ratio=m.mlp_ratio,
      rope_base=m.rope_base)
  noise = d.noise > 0
  eval_batch = min(cfg.eval.batch, cfg.eval.size)

  evals = tuple((n, data_lib.seq_spec(cfg, n, d.num_train_classes, noise, eval_batch))
                for n in config_lib.eval_names(cfg))
  total = -(-t.num_sequences // t.batch_size)
  scan = t.scan_steps or max(1, min(total, -(-t.eval_every // t.batch_size), 200))
  train_seq = data_lib.seq_spec(cfg, "train", d.num_train_classes, noise, t.batch_size)
  return Static(model=spec, train_seq=train_seq,
                evals=evals, batch_size=t.batch_size, eval_size=cfg.eval.size,
                eval_batch=eval_batch, optimizer=t.optimizer,
                b1=t.b1, b2=t.b2, eps=t.eps, scan_steps=scan, plan=plan, eval_plans=tuple(eval_plans),
                clamp_evaluators=tuple(n.strip() for n in cfg.eval.clamp_evaluators.split(",")
                                       if n.strip()))


def build_props(settings: list[dict], cfg, clamp_params=None) -> Props:
  """Stacked per-run props (numpy, leading run axis) of a group."""
  caps = (cfg.data.num_train_classes, cfg.data.num_labels)
  data = [data_lib.make_data_props(s, *caps) for s in settings]
  stack = lambda xs: np.stack(xs)
  return Props(
      init_seed=np.asarray([s["seeds.init"] for s in settings], np.uint32),
      data_seed=np.asarray([s["seeds.data"] for s in settings], np.uint32),
      eval_seed=np.asarray([s["seeds.eval"] for s in settings], np.uint32),
      learning_rate=np.asarray([s["train.learning_rate"] for s in settings], np.float32),
      weight_decay=np.asarray([s["train.weight_decay"] for s in settings], np.float32),
      data=jax.tree.map(lambda *xs: stack(xs), *data),
      clamp=clamp_params)
