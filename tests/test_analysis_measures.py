"""Tests for icldyn.analysis.measures: each measure against an independent computation.

Models are tiny (d_model 16, 2 heads, context 2); the hand-built ones are
real models whose attention is clamped, so a measure sees exactly the
pattern the test wrote.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from icldyn import clamps as clamps_lib
from icldyn.tasks import fewshot as data_lib
from icldyn import model as model_lib
from icldyn import build
from icldyn.analysis import measures, weights
from icldyn.tasks import fewshot

D, H, DH, L = 16, 2, 8, 5


@pytest.fixture(scope="module")
def group():
  """A prepared two-run group of the tiny config, with initial params."""
  pg = build.prepare(tiny_config(), ["seeds.init=0,1"]).groups[0]
  params = jax.device_get(jax.jit(jax.vmap(lambda s: model_lib.init_params(pg.static.model, s)))(
      pg.props.init_seed))
  batch = measures.eval_batch(pg.static, pg.table, pg.props, 32)
  return pg, params, batch


@dataclasses.dataclass(frozen=True)
class PatternPlan:
  """A clamp plan that writes one head's attention rows (see icldyn.clamps plans).

  kind: 'induction' sets layer 1 head `head`'s query row to the correct label
  token(s) ('anti': the other label tokens); 'prev' sets layer 0 head `head`
  to attend to the previous token at every position.
  """
  kind: str
  head: int = 0

  def forward(self, spec, params, batch, num_labels, clamp_params):
    b, t, c = batch.labels.shape[0], spec.seq_len, spec.front.context_len
    if self.kind == "prev":
      rows = np.zeros((t, t), np.float32)
      rows[0, 0] = 1.0
      rows[np.arange(1, t), np.arange(t - 1)] = 1.0
      value = jnp.zeros((b, spec.num_heads, t, t)).at[:, self.head].set(rows)
      mask = np.zeros((1, spec.num_heads, 1, 1), bool)
      mask[:, self.head] = True
      layer = "layer_0"
    else:
      correct = batch.classes[:, :-1] == batch.classes[:, -1:]  # [B, C]
      target = correct if self.kind == "induction" else ~correct
      w = target / jnp.sum(target, axis=-1, keepdims=True)
      row = jnp.zeros((b, t)).at[:, 1:2 * c:2].set(w)
      value = jnp.zeros((b, spec.num_heads, t, t)).at[:, self.head, t - 1].set(row)
      mask = np.zeros((1, spec.num_heads, t, 1), bool)
      mask[:, self.head, t - 1] = True
      layer = f"layer_{spec.num_layers - 1}"
    tree = {layer: {"attn": {"pattern": clamps_lib.Clamp(value, mask)}}}
    return model_lib.apply(spec, params, batch, num_labels, tree)


def _run(pg, params, batch, names, plan=None):
  static = dataclasses.replace(pg.static, plan=plan)
  program = measures.make_program(static, names)
  out = jax.device_get(program.fn(params, batch, pg.props))
  return out, program


def _patterns(pg, params, batch, plan, run):
  """Layer patterns of one run, computed directly (independent of measures)."""
  p = jax.tree.map(lambda x: x[run], params)
  b = jax.tree.map(lambda x: x[run], batch)
  num = pg.props.data.num_labels[run]
  if plan is None:
    logits, acts = model_lib.apply(pg.static.model, p, b, num)
  else:
    logits, acts = plan.forward(pg.static.model, p, b, num, None)
  return np.asarray(logits), {l: np.asarray(acts[f"layer_{l}"]["attn"]["pattern"]) for l in (0, 1)}


def _induction_by_loop(pattern, classes):
  """The definition, one sequence and head at a time."""
  b, h, t, _ = pattern.shape
  out = np.zeros(h)
  for j in range(h):
    for s in range(b):
      for i in range((t - 1) // 2):
        a = pattern[s, j, t - 1, 2 * i + 1]
        out[j] += a if classes[s, i] == classes[s, -1] else -a
  return out / b


def _prev_by_loop(pattern):
  b, h, t, _ = pattern.shape
  out = np.zeros(h)
  labels = list(range(1, t - 1, 2))
  for j in range(h):
    for s in range(b):
      for i in labels:
        a = pattern[s, j, i, i - 1]
        out[j] += a - (1 - a) / (i + 1)
  return out / (b * len(labels))


@pytest.mark.parametrize("kind,want", [("induction", 1.0), ("anti", -1.0)])
def test_clamped_perfect_induction_head_has_strength_one(group, kind, want):
  pg, params, batch = group
  plan = PatternPlan(kind, head=1)
  out, program = _run(pg, params, batch, ["induction_strength", "prev_token", "loss"], plan)
  assert program.layout["induction_strength"][1] == measures.RowKey("induction_strength", 1, 1)
  np.testing.assert_allclose(out["induction_strength"][:, 1], want, atol=1e-6)
  for run in range(2):
    logits, pats = _patterns(pg, params, batch, plan, run)
    classes = np.asarray(batch.classes[run])
    # The unclamped head, and the previous-token score, by the definition.
    np.testing.assert_allclose(out["induction_strength"][run, 0],
                               _induction_by_loop(pats[1], classes)[0], atol=1e-6)
    np.testing.assert_allclose(out["prev_token"][run], _prev_by_loop(pats[0]), atol=1e-6)
    # Loss and accuracy of the query, by hand.
    q = logits[:, -1].astype(np.float64)
    target = np.asarray(batch.labels[run, :, -1])
    logp = q - np.log(np.sum(np.exp(q - q.max(-1, keepdims=True)), -1, keepdims=True)) - q.max(
        -1, keepdims=True)
    np.testing.assert_allclose(out["loss"][run], -np.mean(logp[np.arange(len(q)), target]),
                               rtol=1e-5)
    np.testing.assert_allclose(out["acc"][run], np.mean(np.argmax(q, -1) == target), atol=1e-7)


def test_chunked_runs_give_the_same_numbers(group):
  pg, params, batch = group
  names = ["induction_strength", "loss"]
  run = lambda chunk: jax.device_get(  # noqa: E731
      measures.make_program(pg.static, names, chunk=chunk).fn(params, batch, pg.props))
  whole, one = run(0), run(1)
  for k in whole:
    np.testing.assert_allclose(whole[k], one[k], rtol=1e-6, atol=1e-7)


def test_clamped_previous_token_head_scores_one(group):
  pg, params, batch = group
  out, _ = _run(pg, params, batch, ["prev_token"], PatternPlan("prev", head=0))
  np.testing.assert_allclose(out["prev_token"][:, 0], 1.0, atol=1e-6)
  # A head attending uniformly scores 1/(i+1)^2 at position i under this
  # chance correction (a - (1-a)/(i+1)), not 0: labels sit at i = 1, 3.
  uniform = np.full((1, 1, 5, 5), 0.0)
  for i in range(5):
    uniform[0, 0, i, :i + 1] = 1.0 / (i + 1)
  layout = fewshot.FewShotFront(context_len=2, input_dim=8, num_labels=5).layout
  np.testing.assert_allclose(measures.prev_token(jnp.asarray(uniform, jnp.float32), layout),
                             [np.mean([1 / 4, 1 / 16])], rtol=1e-6)


def test_eval_batch_is_the_fsl_train_evaluation_set(group):
  pg, _, batch = group
  # Sequence i of the fsl_train set, drawn one at a time as the evaluator keys it.
  from icldyn import step as train_lib
  props = jax.tree.map(lambda x: jnp.asarray(x[1]), pg.props)
  table = jax.tree.map(jnp.asarray, pg.table)
  # The evaluator's key, as training derives it: fold_in(fold_in(seed, EVAL_STREAM), index).
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(props.eval_seed),
                                              train_lib.EVAL_STREAM),
                           fewshot.EVALUATORS.index("fsl_train"))
  spec = dict(pg.static.task.evals)["fsl_train"]
  one = jax.jit(lambda k, t, d: data_lib.sample_batch(k, t, d, spec, 1, 7))(key, table, props.data)
  np.testing.assert_array_equal(batch.classes[1, 7], one.classes[0])
  np.testing.assert_array_equal(batch.inputs[1, 7], one.inputs[0])


def _zeros():
  p = {"embed_y": {"embedding": np.zeros((L, D), np.float32)},
       "unembed": {"kernel": np.zeros((D, L), np.float32), "bias": np.zeros(L, np.float32)}}
  for l in range(2):
    p[f"layer_{l}"] = {"attn": {k: np.zeros((D, H, DH), np.float32) for k in ("w_q", "w_k", "w_v")}}
    p[f"layer_{l}"]["attn"]["w_o"] = np.zeros((H, DH, D), np.float32)
  return p


def _weight_program(params_list, names):
  """Runs the weight measures of stacked hand-built params through a tiny group's program."""
  seeds = ",".join(str(i) for i in range(len(params_list)))
  pg = build.prepare(tiny_config(), [f"seeds.init={seeds}"]).groups[0]
  # Weight measures read only the attention, label embedding and unembedding.
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *params_list)
  program = measures.make_program(pg.static, names)
  return jax.device_get(program.fn(stacked, None, pg.props)), program


def _rows(out, program):
  """{RowKey: [R] values} from a program's output."""
  flat = measures.flatten(out, program.layout)
  keys = [k for rows in program.layout.values() for k in rows]
  return {k: flat[:, i] for i, k in enumerate(keys)}


def test_composition_rows_name_the_composing_pair_and_orthogonal_ones_sit_at_baseline():
  # Earlier head 0 writes dim 0, earlier head 1 writes dim 1 (rank-1 OV
  # circuits); later head 1's keys read dim 0, later head 0's read dim 3;
  # queries read dims 2 and 4, values dims 5 and 6. So only
  # (later 1 <- earlier 0) K-composes, with score exactly 1; every other
  # pair and kind is orthogonal, at minus the random baseline.
  p = _zeros()
  e, l = p["layer_0"]["attn"], p["layer_1"]["attn"]
  e["w_v"][15, 0, 0], e["w_o"][0, 0, 0] = 1.0, 2.0
  e["w_v"][14, 1, 0], e["w_o"][1, 0, 1] = 1.0, 1.0
  l["w_k"][0, 1, 0], l["w_k"][3, 0, 0] = 1.0, 1.0
  l["w_q"][2, 1, 0], l["w_q"][4, 0, 0] = 1.0, 1.0
  l["w_v"][5, 1, 0], l["w_v"][6, 0, 0] = 1.0, 1.0
  l["w_o"][:, 0, 7] = 1.0
  out, program = _weight_program([p], ["composition"])
  rows = _rows(out, program)
  base = weights.composition_baseline(D, DH, DH)
  assert len(rows) == 3 * H * H
  for key, v in rows.items():
    assert (key.layer, key.layer2) == (1, 0)
    want = 1.0 - base if (key.measure, key.head, key.head2) == ("k_composition", 1, 0) else -base
    assert v[0] == pytest.approx(want, abs=1e-5), key


def test_svd_shares_match_weights_and_a_hand_built_circuit():
  rng = np.random.default_rng(0)
  rand = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), _zeros())
  # Earlier head 0: W_OV = 2 e15 e0^T + 1 e14 e1^T (singular values 2, 1);
  # later head 0 reads only e1 with its keys, so the second component carries all.
  p = _zeros()
  e, l = p["layer_0"]["attn"], p["layer_1"]["attn"]
  e["w_v"][15, 0, 0], e["w_v"][14, 0, 1] = 1.0, 1.0
  e["w_o"][0, 0, 0], e["w_o"][0, 1, 1] = 2.0, 1.0
  l["w_k"][1, 0, 0], l["w_q"][3, 0, 0] = 1.0, 1.0
  r0 = rand["layer_0"]["attn"]
  e["w_v"][:, 1], e["w_o"][1] = r0["w_v"][:, 1], r0["w_o"][1]
  out, _ = _weight_program([rand, p], ["k_composition_svd_share"])
  shares = out["k_composition_svd_share/0/1"]
  want = _svd_shares_reference(rand)
  np.testing.assert_allclose(shares[0], want, atol=2e-4)
  np.testing.assert_allclose(np.sum(shares[0], -1), 1.0, atol=1e-5)
  np.testing.assert_allclose(shares[1, 0, 0, :2], [0.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(weights.k_composition_svd_shares(jax.tree.map(jnp.asarray, rand)),
                             want, atol=2e-4)


def _svd_shares_reference(p):
  """Shares from a full float64 SVD of each [d, d] W_OV (independent of the QR route)."""
  e, l = p["layer_0"]["attn"], p["layer_1"]["attn"]
  dh = e["w_v"].shape[2]
  out = np.zeros((l["w_q"].shape[1], e["w_v"].shape[1], dh))
  for i in range(e["w_v"].shape[1]):
    w_ov = e["w_v"][:, i].astype(np.float64) @ e["w_o"][i].astype(np.float64)
    _, s, vt = np.linalg.svd(w_ov)
    for j in range(l["w_q"].shape[1]):
      w_qk = l["w_q"][:, j].astype(np.float64) @ l["w_k"][:, j].astype(np.float64).T
      c = s[:dh] ** 2 * np.sum((w_qk @ vt[:dh].T) ** 2, axis=0)
      out[j, i] = c / c.sum()
  return out


def _copying_by_eigenvalues(p, n):
  """Elhage et al.'s copying score of each last-layer head on the first n labels, in numpy."""
  a = p["layer_1"]["attn"]
  e = np.asarray(p["embed_y"]["embedding"], np.float64)[:n]
  w_u = np.asarray(p["unembed"]["kernel"], np.float64)[:, :n]
  out = []
  for h in range(H):
    m = e @ np.asarray(a["w_v"][:, h], np.float64) @ np.asarray(a["w_o"][h], np.float64) @ w_u
    lam = np.linalg.eigvals(m)
    out.append(np.real(lam.sum()) / np.abs(lam).sum())
  return np.asarray(out)


SPEC5 = fewshot.model_spec(num_layers=2, num_heads=H, d_model=D, num_labels=L, context_len=2,
                           input_dim=D)


def test_ov_copying_uses_only_the_runs_labels():
  rng = np.random.default_rng(1)
  p = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), _zeros())
  for n in (3, L):
    got = measures.ov_copying(p, SPEC5, jnp.asarray(n))
    np.testing.assert_allclose(got, _copying_by_eigenvalues(jax.device_get(p), n), atol=1e-5)
  # A head whose label map is the identity copies perfectly.
  q = _zeros()
  a = q["layer_1"]["attn"]
  q["embed_y"]["embedding"][:, :L] = np.eye(L)
  q["unembed"]["kernel"][:L, :] = np.eye(L)
  a["w_v"][:L, 0, :L], a["w_o"][0, :L, :L] = np.eye(L), np.eye(L)
  assert float(measures.ov_copying(jax.tree.map(jnp.asarray, q), SPEC5, jnp.asarray(L))[0]) == (
      pytest.approx(1.0, abs=1e-6))


def test_layout_and_names():
  spec = fewshot.model_spec(num_layers=3, num_heads=2, d_model=16, num_labels=5,
                            context_len=2, input_dim=16)
  lay = measures.make_layout(spec, measures.MEASURES, ("keep_head_0",))
  assert [k for k in lay if "/" in k] == [
      "q_composition/0/1", "k_composition/0/1", "v_composition/0/1", "k_composition_svd_share/0/1",
      "q_composition/0/2", "k_composition/0/2", "v_composition/0/2", "k_composition_svd_share/0/2",
      "q_composition/1/2", "k_composition/1/2", "v_composition/1/2", "k_composition_svd_share/1/2"]
  assert lay["induction_strength"][0] == measures.RowKey("induction_strength", 2, 0)
  assert lay["loss@keep_head_0"] == [measures.RowKey("loss@keep_head_0")]
  assert len(lay["k_composition_svd_share/1/2"]) == H * H * 8
  assert lay["k_composition_svd_share/1/2"][1] == measures.RowKey(
      "k_composition_svd_share.c1", 2, 0, 1, 0)
  # Counted by hand: induction, previous-token and OV copying per head (3 H), loss and
  # acc, both again under the clamp, and for each of the 3 layer pairs 3 composition
  # kinds and the SVD shares (d_head = 8 components) per head pair.
  assert measures.rows_per_run(lay) == 3 * H + 2 + 2 + 3 * (3 * H * H + 8 * H * H)
  with pytest.raises(ValueError, match="unknown measures"):
    measures.make_program(None, ["nope"])
