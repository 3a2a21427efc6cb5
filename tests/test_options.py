"""Options of the README's field table that change the model, the data, the
optimizer or the checkpoint stream, each against an independent computation.

Model options: the forward pass of `build.model_spec(config)` recomputed in
numpy from the parameters (no compile group needed). Training options: two
tiny workdirs trained by `runner.train` (one compile group each, 10 optimizer
steps), whose parameters are compared with optax's own optimizers run by hand
on the same batches, and whose checkpoint stream and evaluators are compared
with schedules worked out by hand.
"""

import csv
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from icldyn import build
from icldyn import model as model_lib
from icldyn import runner
from icldyn import step as step_lib
from icldyn.store import checkpoints as ckpt_lib
from icldyn.tasks import fewshot

B, C, D, DM = 4, 2, 16, 16  # batch, context pairs, exemplar dim, d_model (tiny_config)
T = 2 * C + 1


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((B, C + 1, D)).astype(np.float32)
  y = rng.integers(0, 5, (B, C + 1)).astype(np.int32)
  return x, y


def _forward(inputs, **fields):
  """(spec, params, logits, acts) of tiny_config(**fields)'s model, init seed 0, in numpy."""
  spec = build.model_spec(tiny_config(**fields))
  params = model_lib.init_params(spec, 0)
  x, y = inputs
  logits, acts = jax.jit(lambda p: fewshot.apply(spec, p, x, y, 5))(params)
  return spec, *jax.tree.map(np.asarray, (params, logits, acts))


def _tokens(p, inputs):
  """The front end's token embeddings [B, T, d] by hand: x_1, y_1, x_2, y_2, x_q."""
  x, y = inputs
  ex = x @ p["embed_x"]["kernel"] + p["embed_x"]["bias"]
  ey = p["embed_y"]["embedding"][y[:, :-1]]
  return np.stack([ex[:, 0], ey[:, 0], ex[:, 1], ey[:, 1], ex[:, 2]], 1)


def _ln(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _sinusoid(t, d):
  """Vaswani et al. 2017: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same)."""
  pe = np.zeros((t, d))
  for pos in range(t):
    for i in range(d // 2):
      pe[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / d))
      pe[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / d))
  return pe


def test_sinusoidal_positions_are_added_to_the_tokens_and_nothing_rotates(inputs):
  _, p, _, acts = _forward(inputs, model__pos_embedding="sinusoidal")
  assert "pos" not in p
  np.testing.assert_allclose(acts["embed"], _tokens(p, inputs) + _sinusoid(T, DM), atol=1e-5)
  # No RoPE: q and k are the plain projections of the normalised stream.
  a, x = p["layer_0"]["attn"], _ln(acts["embed"], p["layer_0"]["ln"])
  np.testing.assert_allclose(acts["layer_0"]["attn"]["q"], np.einsum("btd,dhe->bthe", x, a["w_q"]),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(acts["layer_0"]["attn"]["k"], np.einsum("btd,dhe->bthe", x, a["w_k"]),
                             rtol=1e-4, atol=1e-5)


def test_rope_rotates_q_and_k_and_adds_nothing_to_the_tokens(inputs):
  # The default, as the contrast for the two other position embeddings.
  _, p, _, acts = _forward(inputs)
  np.testing.assert_allclose(acts["embed"], _tokens(p, inputs), atol=1e-5)
  a, x = p["layer_0"]["attn"], _ln(acts["embed"], p["layer_0"]["ln"])
  plain = np.einsum("btd,dhe->bthe", x, a["w_q"])
  q = acts["layer_0"]["attn"]["q"]
  np.testing.assert_allclose(q[:, 0], plain[:, 0], rtol=1e-4, atol=1e-5)  # angle 0 at position 0
  assert np.max(np.abs(q[:, 1:] - plain[:, 1:])) > 1e-2  # rotated elsewhere
  # A rotation keeps each pair's norm.
  pairs = lambda v: np.hypot(v[..., 0::2], v[..., 1::2])
  np.testing.assert_allclose(pairs(q), pairs(plain), rtol=1e-4, atol=1e-5)


def test_learned_positions_are_a_parameter_added_to_the_tokens(inputs):
  _, p, _, acts = _forward(inputs, model__pos_embedding="learned")
  assert p["pos"].shape == (T, DM)
  # Initialised N(0, 0.02^2): 80 values, the sample std within 30 % (its sd is ~8 %).
  assert 0.014 < p["pos"].std() < 0.026
  np.testing.assert_allclose(acts["embed"], _tokens(p, inputs) + p["pos"], atol=1e-5)


def test_without_layer_norm_the_stream_is_never_normalised(inputs):
  _, p, logits, acts = _forward(inputs, model__layer_norm=False)
  assert not [k for k in p if "ln" in k] and "ln" not in p["layer_0"]
  a = p["layer_0"]["attn"]
  np.testing.assert_allclose(acts["layer_0"]["attn"]["v"],
                             np.einsum("btd,dhe->bthe", acts["embed"], a["w_v"]),
                             rtol=1e-4, atol=1e-5)
  final = acts["layer_1"]["resid_post"]
  np.testing.assert_array_equal(acts["resid_final"], final)
  want = final[:, 0::2] @ p["unembed"]["kernel"] + p["unembed"]["bias"]
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


def test_mlp_ratio_adds_a_gelu_mlp_after_attention(inputs):
  _, p, _, acts = _forward(inputs, model__mlp_ratio=2.0)
  for layer in ("layer_0", "layer_1"):
    lp, la = p[layer], acts[layer]
    assert lp["mlp_in"]["kernel"].shape == (DM, 2 * DM)
    assert lp["mlp_out"]["kernel"].shape == (2 * DM, DM)
    mid = la["resid_pre"] + la["attn"]["out"]
    h = _ln(mid, lp["ln_mlp"]) @ lp["mlp_in"]["kernel"] + lp["mlp_in"]["bias"]
    gelu = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    mlp = gelu @ lp["mlp_out"]["kernel"] + lp["mlp_out"]["bias"]
    np.testing.assert_allclose(la["mlp_out"], mlp, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(la["resid_post"], mid + mlp, rtol=1e-5, atol=1e-5)
  _, p0, _, acts0 = _forward(inputs)  # attention only: no MLP anywhere
  assert "mlp_in" not in p0["layer_0"] and "mlp_out" not in acts0["layer_0"]
  np.testing.assert_allclose(acts0["layer_0"]["resid_post"],
                             acts0["layer_0"]["resid_pre"] + acts0["layer_0"]["attn"]["out"],
                             rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# The optimizer step against optax.


def _reference_optimizer(name, lr, wd, b1, b2, eps):
  """optax's own optimizer for icldyn's: Adam with coupled L2 decay (torch's
  Adam(weight_decay)) is optax.adam after add_decayed_weights; AdamW is
  optax.adamw; SGD with decay is optax.sgd after add_decayed_weights (torch's
  SGD(weight_decay))."""
  if name == "adamw":
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(wd), optax.adam(lr, b1=b1, b2=b2, eps=eps))
  return optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))


def _optax_trajectory(cfg, pg, run, steps):
  """Run `run` of a prepared group trained by optax on icldyn's batches and
  loss: (start params, params after `steps` steps, the per-step losses)."""
  static = pg.static
  table = jax.tree.map(jnp.asarray, pg.table)
  props = jax.tree.map(lambda x: jnp.asarray(x[run]), pg.props)
  opt = _reference_optimizer(static.optimizer, float(props.learning_rate),
                             float(props.weight_decay), cfg.train.b1, cfg.train.b2, cfg.train.eps)

  @jax.jit
  def one(params, state, t):
    batch = step_lib.train_batch(static, table, props, t)
    loss, g = jax.value_and_grad(step_lib.loss_fn)(params, static, batch, props)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss

  start = params = model_lib.init_params(static.model, props.init_seed)
  state, losses = opt.init(params), []
  for t in range(steps):
    params, state, loss = one(params, state, t)
    losses.append(float(loss))
  return jax.device_get(start), jax.device_get(params), losses


def _assert_same_step(got, want, start, what):
  """Same batches and gradients, so the two differ only by the float rounding
  of two programs: within 1e-4 of the distance each parameter travelled (Adam
  divides by sqrt(v), turning 1-ulp gradient differences into ~1e-6 relative
  update differences per step; a wrong learning rate, decay or moment is off
  by O(1) of it)."""
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  for path, w in jax.tree_util.tree_leaves_with_path(want):
    g, s = np.asarray(flat_got[path]), np.asarray(_leaf(start, path))
    assert np.all(np.isfinite(g)), (what, path)
    travelled = np.linalg.norm(np.asarray(w) - s)
    assert travelled > 0, (what, path)
    assert np.linalg.norm(g - w) <= 1e-4 * travelled, (what, path, np.linalg.norm(g - w), travelled)


def _leaf(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


@pytest.mark.parametrize("optimizer, fields", [
    pytest.param("adam", {}, marks=pytest.mark.slow),
    pytest.param("sgd", {"model.pos_embedding": "sinusoidal"}, marks=pytest.mark.slow),
])  # make test-slow for time; the matrix test compares adamw against optax in make test
def test_one_step_program_equals_optax(optimizer, fields):
  """icldyn's step, per-run learning rate and decay in one vmapped program, 3 steps."""
  steps = 3
  cfg = tiny_config(**{"train.optimizer": optimizer, **fields})
  lrs = "1e-2/0.0,3e-2/0.1" if optimizer == "adam" else "0.5/0.0,1.0/0.05"
  (pg,) = build.prepare(cfg, [f"train.learning_rate+train.weight_decay={lrs}"]).groups
  static = pg.static
  table = jax.tree.map(jnp.asarray, pg.table)
  props = jax.tree.map(jnp.asarray, pg.props)
  step = jax.jit(jax.vmap(lambda st, pr, t: step_lib.train_step(static, table, st, pr, t),
                          (0, 0, None)))
  state = jax.vmap(lambda pr: step_lib.init_state(static, pr))(props)
  for t in range(steps):
    state, _ = step(state, props, t)
  for run in range(2):
    start, want, _ = _optax_trajectory(cfg, pg, run, steps)
    got = jax.tree.map(lambda x: np.asarray(x[run]), state.params)
    _assert_same_step(got, want, start, (optimizer, run))
  # The two runs' settings differ, and so do their parameters.
  assert not np.array_equal(state.params["unembed"]["kernel"][0],
                            state.params["unembed"]["kernel"][1])


# --------------------------------------------------------------------------
# A tiny workdir over the other options, trained by `icldyn train`'s library call.

STEPS, BATCH = 40, 16
MATRIX = {
    "train.optimizer": "adamw", "model.pos_embedding": "learned", "model.mlp_ratio": 2.0,
    "model.layer_norm": False, "data.rest": "iid", "data.context_len": 3, "data.relabel": False,
    "data.label_holdout": 0.0, "train.scan_steps": 3, "train.num_sequences": STEPS * BATCH,
    "train.batch_size": BATCH, "train.eval_every": 160,
    "eval.evaluators": "fsl_train,fsl_train_valex", "eval.clamps": "keep_head_0",
    "eval.clamp_evaluators": "fsl_train_valex",
    "checkpoint.every": 0, "checkpoint.steps": "50,300", "checkpoint.log_num": 3,
    "checkpoint.resume_every": 0,
}
MATRIX_RUNS = "train.learning_rate+train.weight_decay=3e-3/0.0,6e-3/0.1"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
  cfg = tiny_config(**MATRIX)
  workdir = str(tmp_path_factory.mktemp("matrix"))
  runner.train(cfg, workdir, [MATRIX_RUNS], quiet=True)
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  return cfg, workdir, rows


def test_matrix_checkpoints_follow_steps_and_log_num(matrix):
  _, workdir, _ = matrix
  # By hand: explicit 50 and 300 sequences and 3 log-spaced points between one
  # batch and the end (16, 101.2, 640 -> 16, 101, 640), each rounded up to a
  # whole batch of 16 (50 -> 64, 101 -> 112, 300 -> 304), and the last step.
  assert ckpt_lib.stream_steps(workdir, 0) == [16, 64, 112, 304, 640]


def test_matrix_clamp_evaluators_are_the_listed_ones(matrix):
  _, _, rows = matrix
  evaluators = {r["evaluator"] for r in rows}
  assert evaluators == {"train", "fsl_train", "fsl_train_valex", "fsl_train_valex@keep_head_0"}
  value = lambda ev: {(r["step"], r["run"]): float(r["value"]) for r in rows
                      if r["evaluator"] == ev and r["metric"] == "loss"}
  clamped, plain = value("fsl_train_valex@keep_head_0"), value("fsl_train_valex")
  assert clamped.keys() == plain.keys()
  assert all(clamped[k] != plain[k] for k in plain)  # the clamp changes the evaluation


def test_matrix_metrics_finite_and_parameters_equal_optax_adamw(matrix):
  cfg, workdir, rows = matrix
  assert all(np.isfinite(float(r["value"])) for r in rows if r["metric"] != "acc_out_context")
  (pg,) = build.prepare(cfg, [MATRIX_RUNS]).groups
  assert pg.static.scan_steps == 3 and pg.static.optimizer == "adamw"
  for run in range(2):
    start, want, losses = _optax_trajectory(cfg, pg, run, STEPS)
    got = ckpt_lib.restore_run(workdir, STEPS * BATCH, 0, run)
    assert got["pos"].shape == (T + 2, DM) and "mlp_in" in got["layer_1"]
    assert "ln_final" not in got
    _assert_same_step(got, want, start, run)
    # train/loss: the mean over the optimizer steps since the previous evaluation.
    logged = {int(r["step"]): float(r["value"]) for r in rows if r["evaluator"] == "train"
              and r["metric"] == "loss" and r["run"] == str(run)}
    assert logged[STEPS * BATCH] == pytest.approx(np.mean(losses[30:]), rel=1e-5)


def test_matrix_loss_falls_on_a_task_learnable_in_seconds(matrix):
  # data.relabel=False: a class always carries the same label (class mod 5), so
  # the query's label is a function of its exemplar, which 640 sequences of
  # Adam teach a model to read. Chance is ln 5 = 1.61 nats and the initial
  # model is worse (its logits are not uniform); the end must be well below chance.
  _, _, rows = matrix
  for run in ("0", "1"):
    loss = {int(r["step"]): float(r["value"]) for r in rows if r["evaluator"] == "fsl_train"
            and r["metric"] == "loss" and r["run"] == run}
    steps = sorted(loss)
    assert loss[steps[-1]] < 0.5 * min(loss[steps[0]], math.log(5)), loss
