"""The performance paths (docs/performance.md) compute what the plain ones do.

Each fast path is compared with the plain computation it replaces: the
broadcast attention products with `einsum`, the table-row embedding with the
per-token embedding, `model.contract`'s gradient rule with JAX's, the
grid-level divergence guard with the per-run guard, and the CPU device set-up
with its documented rules.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icldyn import build, sharding
from icldyn import model as model_lib
from icldyn import step as train_lib
from icldyn.model import core as model_core
from icldyn.tasks import fewshot
from icldyn.tasks import fewshot as data_lib
from conftest import tiny_config

SPEC = fewshot.model_spec(num_layers=2, num_heads=2, d_model=16, num_labels=5,
                          context_len=2, input_dim=8)


def _close(a, b, rel=1e-6):
  """Norm-wise float32 agreement: ||a - b|| <= rel ||b|| (+ a tiny floor for zeros)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  inf = np.isinf(b)  # masked scores and logits: -inf in both
  np.testing.assert_array_equal(a[inf], b[inf])
  a, b = np.where(inf, 0.0, a), np.where(inf, 0.0, b)
  assert np.linalg.norm(a - b) <= rel * np.linalg.norm(b) + 1e-12, np.abs(a - b).max()


def _batch(seed=1, b=4):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(k1, (b, 3, 8)), jax.random.randint(k2, (b, 3), 0, 5)


def test_small_attention_products_equal_einsum(monkeypatch):
  params = model_lib.init_params(SPEC, 0)
  x, y = _batch()
  def run(p):
    return fewshot.apply(SPEC, p, x, y, 5)
  def loss(p):
    return jnp.sum(run(p)[0][:, -1, :] ** 2)
  small = (run(params), jax.grad(loss)(params))
  monkeypatch.setattr(model_core, "SMALL_ATTENTION", 0)  # every context takes the einsum
  plain = (run(params), jax.grad(loss)(params))
  # float32 sums of 5-8 terms in another order: rounding, so compared norm-wise
  # per array (an entry that is a difference of large terms may differ more).
  for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(plain)):
    _close(a, b)
  z_small = small[0][1]["layer_1"]["attn"]["z"]
  pattern, v = (small[0][1]["layer_1"]["attn"][k] for k in ("pattern", "v"))
  np.testing.assert_allclose(z_small, np.einsum("bhqk,bkhe->bqhe", pattern, v),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_contract_gradients_equal_tensordot(k):
  # The weight-gradient layout is the point of `contract`; its values must be
  # tensordot's, batched (vmap over runs, as in a grid) or not.
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(k), 3)
  x = jax.random.normal(kx, (3, 4, 5, 6, 7)[:3 + k])  # [runs, batch, tokens, *In]
  w_shape = x.shape[3:] + (9, 2)
  w = jax.random.normal(kw, (3,) + w_shape)
  g = jax.random.normal(kg, x.shape[:3] + (9, 2))
  def vjp(f):
    out, pull = jax.vjp(jax.vmap(f), x, w)
    return (out,) + pull(g)
  mine = vjp(lambda a, b: model_core.contract(a, b, k))
  plain = vjp(lambda a, b: jnp.tensordot(a, b, axes=k))
  for a, b in zip(mine, plain):
    assert a.shape == b.shape
    _close(a, b)


def test_model_gradients_do_not_depend_on_the_embedding_rule(monkeypatch):
  params = model_lib.init_params(SPEC, 0)
  x, y = _batch()
  loss = lambda p: jnp.sum(fewshot.apply(SPEC, p, x, y, 5)[0][:, -1, :] ** 2)
  mine = jax.grad(loss)(params)
  monkeypatch.setattr(model_core, "NATURAL_GRADS", False)
  plain = jax.grad(loss)(params)
  for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(plain)):
    _close(a, b)


def test_table_row_embedding_equals_token_embedding():
  params = model_lib.init_params(SPEC, 0)
  rows = jax.random.normal(jax.random.PRNGKey(2), (7, 8))
  index = jax.random.randint(jax.random.PRNGKey(3), (4, 3), 0, 7)
  _, y = _batch()
  tr = data_lib.TableRows(x=rows, index=index)
  def loss(p, table_rows):
    logits, _ = fewshot.apply(SPEC, p, rows[index], y, 5, table_rows=table_rows)
    return jnp.sum(jax.nn.log_softmax(logits[:, -1]) * jax.nn.one_hot(y[:, -1], 5))
  a = jax.value_and_grad(loss)(params, tr)
  b = jax.value_and_grad(loss)(params, None)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    _close(u, v)


def test_sampler_table_rows_index_the_inputs():
  cfg = tiny_config()
  pg = build.prepare(cfg).groups[0]
  assert pg.static.task.train_seq.table_rows  # 12 classes x 1 exemplar < 16 x 3 tokens
  props = jax.tree.map(lambda v: jnp.asarray(v[0]), pg.props)
  table = jax.tree.map(jnp.asarray, pg.table)
  batch = train_lib.train_batch(pg.static, table, props, 3)
  np.testing.assert_array_equal(batch.table_rows.x[batch.table_rows.index], batch.inputs)
  # Without table rows the same key gives the same sequences.
  task = pg.static.task
  static = dataclasses.replace(pg.static, task=dataclasses.replace(
      task, train_seq=dataclasses.replace(task.train_seq, table_rows=False)))
  plain = train_lib.train_batch(static, table, props, 3)
  assert plain.table_rows is None
  np.testing.assert_array_equal(plain.inputs, batch.inputs)
  np.testing.assert_array_equal(plain.labels, batch.labels)


def test_noise_or_many_rows_embed_tokens():
  assert not build.prepare(tiny_config(data__noise=0.5)).groups[0].static.task.train_seq.table_rows
  many = tiny_config(data__num_train_classes=60, data__num_test_classes=6)
  assert not build.prepare(many).groups[0].static.task.train_seq.table_rows  # 60 rows > 48 tokens


# The finite case (45 s) in make test-slow; the diverging one, where the guard acts, stays.
@pytest.mark.parametrize("lr", [pytest.param(1e-3, marks=pytest.mark.slow), 1e30])
def test_grid_guard_equals_the_per_run_step(lr):
  """The chunk's grid-level guard against the vmapped per-run `train_step`: a
  finite grid, and one whose second run diverges at its first step."""
  cfg = tiny_config()
  pg = build.prepare(cfg, [f"seeds.init+train.learning_rate=0/1e-3,1/{lr}"]).groups[0]
  mesh = sharding.run_mesh(2)
  props = jax.tree.map(jnp.asarray, pg.props)
  table = jax.tree.map(jnp.asarray, pg.table)
  init, chunk, _ = train_lib.make_programs(pg.static, mesh)
  state = init(props)
  initial = jax.device_get(state.params)  # `chunk` donates `state`
  per_run = jax.jit(jax.vmap(lambda st, pr, t: train_lib.train_step(pg.static, table, st, pr, t),
                             (0, 0, None)))
  ref = state
  for t in range(3):
    ref, _ = per_run(ref, props, t)
  got, _ = chunk(state, props, table, 0, 3)
  # Two differently compiled programs: equal up to float rounding.
  for a, b in zip(jax.tree.leaves((got.params, got.opt_state)),
                  jax.tree.leaves((ref.params, ref.opt_state))):
    _close(a, b, rel=1e-5)
  np.testing.assert_array_equal(got.diverged, ref.diverged)
  np.testing.assert_array_equal(got.diverged_step, ref.diverged_step)
  assert list(np.asarray(got.diverged)) == [False, lr > 1]
  if lr > 1:  # frozen at its initial parameters, bitwise
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(initial)):
      np.testing.assert_array_equal(np.asarray(a)[1], np.asarray(b)[1])
    assert int(got.diverged_step[1]) == 1


def test_configure_cpu_devices_rules():
  env = {}
  assert sharding.configure_cpu_devices(env) >= 1
  assert "--xla_force_host_platform_device_count=" in env["XLA_FLAGS"]
  env = {"ICLDYN_CPU_DEVICES": "3", "XLA_FLAGS": "--xla_foo=1"}
  assert sharding.configure_cpu_devices(env) == 3
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=3"
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "ICLDYN_CPU_DEVICES": "5"}
  assert sharding.configure_cpu_devices(env) is None  # an explicit flag wins
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  for bad in ("0", "two"):
    with pytest.raises(ValueError, match="ICLDYN_CPU_DEVICES"):
      sharding.configure_cpu_devices({"ICLDYN_CPU_DEVICES": bad})


def test_small_grid_uses_as_many_devices_as_runs():
  from conftest import run_python
  out = run_python("""
from icldyn import sharding
print(sharding.run_mesh(1).devices.size, sharding.run_mesh(3).devices.size,
      sharding.run_mesh(9).devices.size, sharding.run_mesh().devices.size)
""", devices=4)
  assert out.split() == ["1", "3", "4", "4"]
