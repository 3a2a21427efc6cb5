"""What the accelerator paths compute, checked on CPU (README: Determinism).

On GPU and TPU the embedding gradients are one-hot products instead of
scatter-adds (`icldyn.model.take_rows`), the chunk's step mask and divergence
guard are selects instead of conditionals (`step.make_programs(branchless=)`),
and every dot is traced at `train.matmul_precision`. Each is forced here on
CPU and compared with the CPU path, and the precision is read back from the
lowered programs and from config.json.
"""

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icldyn import build, runner, sharding
from icldyn import model as model_lib
from icldyn import step as train_lib
from icldyn.errors import ConfigError
from icldyn.model import core as model_core
from conftest import tiny_config

F32_EPS = float(np.finfo(np.float32).eps)


def _row_sum_bound(index, g, num_rows):
  """Worst-case float32 difference between two summation orders of the rows
  that land on each table row: (n - 1) eps sum|g| for n terms (Higham 2002,
  eq. 4.4), which both orders are within of the exact sum."""
  counts = np.bincount(np.asarray(index).reshape(-1), minlength=num_rows)
  absum = np.zeros((num_rows,) + g.shape[index.ndim:])
  np.add.at(absum, np.asarray(index).reshape(-1), np.abs(np.asarray(g, np.float64)).reshape(
      (-1,) + g.shape[index.ndim:]))
  n = np.maximum(counts - 1, 0).reshape((num_rows,) + (1,) * (g.ndim - index.ndim))
  return 2 * n * F32_EPS * absum


@pytest.mark.parametrize("rule", ["onehot", "auto"])
def test_take_rows_gradient_equals_the_scatter_add(monkeypatch, rule):
  """The one-hot rule against JAX's scatter-add on a table with many repeated
  rows: the same forward bitwise, gradients within float rounding of two
  summation orders. 'auto' on CPU is the scatter-add itself: bitwise."""
  table = jax.random.normal(jax.random.PRNGKey(0), (7, 5))
  index = jax.random.randint(jax.random.PRNGKey(1), (40, 3), 0, 7)  # ~17 uses per row
  g = jax.random.normal(jax.random.PRNGKey(2), (40, 3, 5))
  def grad_of(r):
    monkeypatch.setattr(model_core, "ROW_GRADS", r)
    out, vjp = jax.vjp(lambda t: model_lib.take_rows(t, index), table)
    return np.asarray(out), np.asarray(vjp(g)[0])
  out_ref, grad_ref = grad_of("scatter")
  out, grad = grad_of(rule)
  np.testing.assert_array_equal(out, out_ref)
  if rule == "auto":
    np.testing.assert_array_equal(grad, grad_ref)
  else:
    assert np.all(np.abs(grad - grad_ref) <= _row_sum_bound(index, g, 7))


def test_embed_is_flax_embed_with_take_rows():
  """`model.Embed` makes the parameter nn.Embed makes (name, initialisation) and
  looks rows up the same: old checkpoints load, and a run starts the same."""
  init = model_lib.per_output_init(0.02, 0, corrected=False)
  ids = jnp.array([[0, 3, 3, 1]])
  ours = model_lib.Embed(6, 4, embedding_init=init)
  theirs = nn.Embed(6, 4, embedding_init=init)
  p_ours = ours.init(jax.random.PRNGKey(3), ids)
  p_theirs = theirs.init(jax.random.PRNGKey(3), ids)
  assert jax.tree.structure(p_ours) == jax.tree.structure(p_theirs)
  np.testing.assert_array_equal(p_ours["params"]["embedding"], p_theirs["params"]["embedding"])
  np.testing.assert_array_equal(ours.apply(p_ours, ids), theirs.apply(p_theirs, ids))


def _grid(cfg, seeds=2):
  pg = build.prepare(cfg, [f"seeds.init={','.join(map(str, range(seeds)))}"]).groups[0]
  return (pg, sharding.run_mesh(seeds), jax.tree.map(jnp.asarray, pg.props),
          jax.tree.map(jnp.asarray, pg.table))


def _train(pg, mesh, props, table, branchless, steps):
  """Params and optimizer state after `steps` steps of a chunk cut short
  (scan_steps > steps, so the step mask is exercised), and the losses."""
  init, chunk, _ = train_lib.make_programs(pg.static, mesh, branchless=branchless)
  state, out = chunk(init(props), props, table, 0, steps)
  return jax.device_get((state, out))


def test_accelerator_path_is_repeatable_and_equals_the_cpu_path(monkeypatch):
  """The GPU/TPU program forced on CPU (one-hot gradients, selects instead of
  conditionals): two trainings bitwise equal, and the CPU program's result
  within float rounding (both programs sum the embedding gradients in
  different orders; everything else is the same computation)."""
  cfg = tiny_config(train__scan_steps=8, data__num_labels=3)  # 3 labels: repeated label rows
  pg, mesh, props, table = _grid(cfg)
  assert pg.static.task.train_seq.table_rows  # the exemplar-row gather is in the program
  cpu = _train(pg, mesh, props, table, branchless=False, steps=6)
  monkeypatch.setattr(model_core, "ROW_GRADS", "onehot")
  first = _train(pg, mesh, props, table, branchless=True, steps=6)
  second = _train(pg, mesh, props, table, branchless=True, steps=6)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)
  # Masked steps 6, 7 left the state alone and reported zeros, as the CPU path does.
  np.testing.assert_array_equal(first[1][0][6:], 0.0)
  # 6 Adam steps at lr 1e-3 from reordered gradient sums: measured <= 2e-6
  # relative (norm-wise per array); 1e-5 leaves room for other CPUs.
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(cpu)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 1e-12


def _lowered_chunk_text(static, mesh, props, table, branchless=None):
  init, chunk, _ = train_lib.make_programs(static, mesh, branchless=branchless)
  state = jax.eval_shape(init, props)
  return chunk.lower(state, props, table, 0, 1).as_text()


def test_branchless_chunk_has_no_conditionals(monkeypatch):
  """No `stablehlo.case`/`if` in the accelerator chunk (XLA GPU copies a
  conditional's predicate to the host); the CPU chunk has its two. With
  ROW_GRADS 'auto' the lowering also holds `take_rows`'s platform choice, a
  case on a constant index, which XLA removes when it compiles; 'onehot' is
  what it leaves on an accelerator."""
  monkeypatch.setattr(model_core, "ROW_GRADS", "onehot")
  pg, mesh, props, table = _grid(tiny_config(), seeds=1)
  conditional = re.compile(r"stablehlo\.(case|if)\b")
  assert not conditional.search(_lowered_chunk_text(pg.static, mesh, props, table, True))
  assert conditional.search(_lowered_chunk_text(pg.static, mesh, props, table, False))


@pytest.mark.parametrize("precision,mark", [
    ("float32", "precision = [HIGHEST, HIGHEST]"),
    ("tf32", "precision = [HIGH, HIGH]"),
    ("bf16", "lhs_precision_type = bf16"),
])
def test_matmul_precision_is_applied_to_every_dot(precision, mark):
  """Every dot_general of the lowered training chunk and evaluation carries the
  configured precision (none is left at DEFAULT)."""
  pg, mesh, props, table = _grid(tiny_config(train__matmul_precision=precision), seeds=1)
  assert pg.static.matmul_precision == precision
  _, _, evaluate = train_lib.make_programs(pg.static, mesh)
  init, _, _ = train_lib.make_programs(pg.static, mesh)
  state = jax.eval_shape(init, props)
  for text in (_lowered_chunk_text(pg.static, mesh, props, table),
               evaluate.lower(state, props, table).as_text()):
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) > 10
    assert all(mark in line for line in dots), [d for d in dots if mark not in d][:2]


def test_precision_is_recorded_and_a_different_one_refused(tmp_path):
  workdir = str(tmp_path / "wd")
  cfg = tiny_config(train__num_sequences=32, train__eval_every=32, checkpoint__every=0,
                    checkpoint__resume_every=32)
  runner.train(cfg, workdir, quiet=True)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["config"]["train"]["matmul_precision"] == "float32"
  other = tiny_config(train__num_sequences=32, train__eval_every=32, checkpoint__every=0,
                      checkpoint__resume_every=32, train__matmul_precision="tf32")
  with pytest.raises(ConfigError, match=r"differs in: config\.train\.matmul_precision\)"):
    runner.train(other, workdir, quiet=True)
  with pytest.raises(ConfigError, match="train.matmul_precision: must be one of"):
    build.prepare(tiny_config(train__matmul_precision="fp16"))
