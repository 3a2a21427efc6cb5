"""Training: the loss, the pure step, evaluation, and the grid programs (vmap · scan · jit · shard).

The step of one run is a pure function `(state, props, step) -> state`. The
grid applies it with `jax.vmap` over the run axis (sharded over devices) and
`lax.scan` over a fixed number of steps per compiled chunk; a chunk ending at
an event (evaluation, checkpoint) masks its remaining steps, so one program
serves every chunk length. On CPU the mask and the divergence guard are
`lax.cond`s (a skipped branch costs nothing); on accelerators they are
selects, since XLA GPU may copy a conditional's predicate to the host every
step. Either way the values are the same.

Every training and evaluation program traces its matrix products at the
group's `train.matmul_precision` (`PRECISIONS`), recorded in config.json.

A run's data at step t comes from `fold_in(key(seeds.data), t)`, so the
trajectory does not depend on chunking, evaluation frequency, grid size or
the run's position in the grid. Everything about the data, the loss and the
metrics is the task's (`Static.task`, `icldyn.tasks.base.TaskSpec`); this
module never asks which task it runs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from icldyn import model as model_lib
from icldyn import sharding as sharding_lib
from icldyn.clamps import Plan
from icldyn.tasks import TaskSpec

log = logging.getLogger(__name__)

TRAIN_STREAM, EVAL_STREAM = 1, 2  # fold_in tags separating the key streams

# `train.matmul_precision` -> the value of `jax.default_matmul_precision` the
# programs are traced under (README: Determinism). float32: every float32 dot
# in full float32 on every backend (Precision.HIGHEST). tf32: Precision.HIGH,
# TensorFloat-32 on NVIDIA GPUs, three bfloat16 passes on TPU, float32 on CPU.
# bf16: the dot algorithm BF16_BF16_F32 (inputs rounded to bfloat16, float32
# accumulation) on GPU and TPU; XLA CPU computes it in float32.
PRECISIONS = {"float32": "float32", "tf32": "tensorfloat32", "bf16": "BF16_BF16_F32"}


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything shape-level about a group (hashable: it keys compilation).

  Attributes:
    model: the model (its front end is the task's).
    task: the task's static spec: samplers, loss, evaluators, metrics.
    batch_size, eval_size, eval_batch: sequences per step, per evaluator,
      per evaluation micro-batch.
    optimizer, b1, b2, eps: the optimizer.
    scan_steps: steps per compiled chunk.
    plan: the clamp plan used in training, or None.
    eval_plans: named clamps for evaluation, as (name, plan).
    clamp_evaluators: evaluators also run under `eval_plans`.
    matmul_precision: a key of `PRECISIONS` (`train.matmul_precision`).
  """
  model: model_lib.ModelSpec
  task: TaskSpec
  batch_size: int
  eval_size: int
  eval_batch: int
  optimizer: str
  b1: float
  b2: float
  eps: float
  scan_steps: int
  plan: Plan | None = None
  eval_plans: tuple[tuple[str, Plan], ...] = ()
  clamp_evaluators: tuple[str, ...] = ()
  matmul_precision: str = "float32"


def matmul_precision(static: Static):
  """A context in which dots are traced at the group's precision (`PRECISIONS`)."""
  return jax.default_matmul_precision(PRECISIONS[static.matmul_precision])


class Props(NamedTuple):
  """Per-run settings as arrays (leading run axis in a grid).

  Attributes:
    init_seed, data_seed, eval_seed: [] uint32 seeds.
    learning_rate, weight_decay: [] float32.
    data: the task's per-run props (with a `num_outputs` field or property).
    clamp: the per-run clamp arrays of `Static.plan`, or None.
  """
  init_seed: jax.Array
  data_seed: jax.Array
  eval_seed: jax.Array
  learning_rate: jax.Array
  weight_decay: jax.Array
  data: Any
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


def forward(static: Static, params, batch, props: Props, plan: Plan | None = None):
  """Logits and activations of one run's batch, under `plan`'s clamps if any."""
  if plan is None:
    return model_lib.apply(static.model, params, batch, props.data.num_outputs)
  return plan.forward(static.model, params, batch, props.data.num_outputs, props.clamp)


def loss_fn(params, static: Static, batch, props: Props) -> jax.Array:
  """The task's training loss of a batch (under the training clamps)."""
  logits, _ = forward(static, params, batch, props, static.plan)
  return static.task.loss(logits, batch)


def init_state(static: Static, props: Props) -> TrainState:
  """Initial state of one run."""
  params = model_lib.init_params(static.model, props.init_seed)
  return TrainState(params, _moments(static).init(params), jnp.asarray(False),
                    jnp.asarray(-1, jnp.int32))


def train_batch(static: Static, table, props: Props, step):
  """The training batch of optimizer step `step` (0-based); `table`: the group's shared arrays."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(props.data_seed),
                                              TRAIN_STREAM), step)
  return static.task.sample(key, table, props.data, "train", static.batch_size)


def eval_key(static: Static, eval_seed: jax.Array, evaluator: str) -> jax.Array:
  """The key of a run's fixed evaluation set of `evaluator` (sequence i: `fold_in(key, i)`)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(eval_seed), EVAL_STREAM),
                            static.task.evaluator_index(evaluator))


def candidate_step(static: Static, table, state: TrainState, props: Props,
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
    if static.optimizer in ("adam", "sgd"):  # coupled L2, as torch's Adam and SGD weight_decay
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


def train_step(static: Static, table, state: TrainState, props: Props,
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


def evaluate_run(static: Static, table, params, props: Props) -> dict:
  """All evaluators of one run on their fixed evaluation sets.

  Returns:
    {evaluator: {metric: scalar}}, the task's metrics; evaluators under
    named clamps appear as `{evaluator}@{clamp}`.
  """
  out = {}
  task = static.task
  n_chunks = -(-static.eval_size // static.eval_batch)
  for name in task.evaluators:
    key = eval_key(static, props.eval_seed, name)
    extra = static.eval_plans if name in static.clamp_evaluators else ()
    for plan_name, plan in ((None, static.plan),) + extra:
      def chunk(c, plan=plan):
        batch = task.sample(key, table, props.data, name, static.eval_batch,
                            c * static.eval_batch)
        logits, acts = forward(static, params, batch, props, plan)
        return task.eval_terms(name, logits, acts, batch)
      terms = lax.map(chunk, jnp.arange(n_chunks))
      terms = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:static.eval_size], terms)
      out[name if plan_name is None else f"{name}@{plan_name}"] = task.reduce(name, terms)
  return out


# --------------------------------------------------------------------------
# Grid programs.


def make_programs(static: Static, mesh,
                  branchless: bool | None = None) -> tuple[Callable, Callable, Callable]:
  """Compiled grid programs: init, a chunk of training steps, evaluation.

  Args:
    static: the group.
    mesh: the run mesh.
    branchless: the chunk's step mask and divergence guard as selects instead
      of `lax.cond` (no per-step host synchronisation on GPU). None: selects
      on every platform but CPU (the mesh's devices). Same values either way.

  Returns:
    init(props) -> state; chunk(state, props, table, start, n) ->
    (state, (losses [S, R], grad norms [S, R])); evaluate(state, props, table) -> metrics.
  """
  if branchless is None:
    branchless = mesh.devices.flat[0].platform != "cpu"
  run_sharding = jax.sharding.NamedSharding(mesh, P(sharding_lib.RUN_AXIS))
  step_fn = jax.vmap(lambda st, pr, tb, t: candidate_step(static, tb, st, pr, t),
                     (0, 0, None, None))

  def grid_step(c, props, table, t):
    # The guard's select is a pass over parameters and optimizer state; when
    # every run on this device is finite (the usual case) it would pick `new`
    # everywhere, so on CPU it runs only when some run needs it. Same result
    # bitwise.
    new, ok, out = step_fn(c, props, table, t)
    with jax.named_scope("guard"):
      if branchless:
        return guard(c, new, ok, t), out
      fine = jnp.all(ok & ~c.diverged)
      state = lax.cond(fine, lambda n, o: n, lambda n, o: guard(o, n, ok, t), new, c)
    return state, out

  def chunk(state, props, table, start, n):
    def body(carry, i):
      def run(c):
        return grid_step(c, props, table, start + i)
      def skip(c):
        r = c.diverged.shape[0]
        return c, (jnp.zeros((r,), jnp.float32), jnp.zeros((r,), jnp.float32))
      if not branchless:
        return lax.cond(i < n, run, skip, carry)
      # Steps past n are computed and dropped: only a chunk cut short by an
      # event has any, and their data draws depend on nothing but the step.
      stepped, kept = run(carry), skip(carry)
      return jax.tree.map(lambda a, b: jnp.where(i < n, a, b), stepped, kept)
    # unroll=2: the step's new state cannot overwrite the old one (the guard
    # may need it), so a rolled loop copies it back into the carry every step;
    # two steps per iteration let XLA alternate between two buffers instead.
    with matmul_precision(static):
      return lax.scan(body, state, jnp.arange(static.scan_steps), unroll=2)

  # Each device runs the chunk on its own runs (shard_map): runs share no
  # arrays, so nothing crosses devices. Under jit's automatic partitioning the
  # guard's `all` over the grid was a cross-device reduction every step.
  # check_vma=False: the skip branch's zeros are device-local like the rest.
  runs, shared = P(sharding_lib.RUN_AXIS), P()
  local_chunk = jax.shard_map(chunk, mesh=mesh, in_specs=(runs, runs, shared, shared, shared),
                              out_specs=(runs, P(None, sharding_lib.RUN_AXIS)), check_vma=False)

  def init_runs(props):
    with matmul_precision(static):
      return jax.vmap(lambda pr: init_state(static, pr))(props)

  def evaluate_runs(state, props, table):
    with matmul_precision(static):
      return jax.vmap(lambda st, pr: evaluate_run(static, table, st.params, pr))(state, props)

  init = jax.jit(init_runs, out_shardings=run_sharding)
  chunk_jit = jax.jit(local_chunk, donate_argnums=0)
  evaluate = jax.jit(evaluate_runs)
  return init, chunk_jit, evaluate
