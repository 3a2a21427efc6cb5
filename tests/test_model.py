"""The model's shapes and details, and the clamp mechanism."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icldyn import model as model_lib
from icldyn.model import Clamp
from icldyn.model import core as model_core
from icldyn.tasks import fewshot

SPEC = fewshot.model_spec(num_layers=2, num_heads=2, d_model=16, num_labels=5,
                          context_len=2, input_dim=8)
B, T = 3, 5


@pytest.fixture(scope="module")
def setup():
  params = model_lib.init_params(SPEC, 0)
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.normal(k1, (B, 3, 8))
  y = jax.random.randint(k2, (B, 3), 0, 5)
  fwd = jax.jit(lambda p, x, y, c: fewshot.apply(SPEC, p, x, y, 5, c))
  return params, x, y, fwd


def test_activation_shapes_and_causality(setup):
  params, x, y, fwd = setup
  logits, acts = fwd(params, x, y, None)
  assert logits.shape == (B, 3, 5)
  a = acts["layer_1"]["attn"]
  assert a["q"].shape == (B, T, 2, 8) and a["z"].shape == (B, T, 2, 8)
  assert a["pattern"].shape == (B, 2, T, T) and a["out"].shape == (B, T, 16)
  p = np.asarray(a["pattern"])
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
  assert np.all(np.triu(p[0, 0], 1) == 0)  # no attention to the future


def test_forward_matches_an_independent_computation(setup):
  params, x, y, fwd = setup
  logits, acts = fwd(params, x, y, None)
  p = jax.tree.map(np.asarray, params)
  emb_x = np.asarray(x) @ p["embed_x"]["kernel"] + p["embed_x"]["bias"]
  emb_y = p["embed_y"]["embedding"][np.asarray(y)[:, :2]]
  tokens = np.stack([emb_x[:, 0], emb_y[:, 0], emb_x[:, 1], emb_y[:, 1], emb_x[:, 2]], 1)
  np.testing.assert_allclose(acts["embed"], tokens, rtol=1e-5, atol=1e-6)
  # Layer 0 attention recomputed in numpy from its own inputs (no RoPE check here: compare v, z, out).
  a = acts["layer_0"]["attn"]
  ln = p["layer_0"]["ln"]
  mu = tokens.mean(-1, keepdims=True)
  var = tokens.var(-1, keepdims=True)
  xn = (tokens - mu) / np.sqrt(var + 1e-6) * ln["scale"] + ln["bias"]
  v = np.einsum("btd,dhe->bthe", xn, p["layer_0"]["attn"]["w_v"])
  np.testing.assert_allclose(a["v"], v, rtol=1e-4, atol=1e-5)
  z = np.einsum("bhqk,bkhe->bqhe", np.asarray(a["pattern"]), v)
  np.testing.assert_allclose(a["z"], z, rtol=1e-4, atol=1e-5)
  out = np.einsum("bqhe,hed->bqd", z, p["layer_0"]["attn"]["w_o"])
  np.testing.assert_allclose(a["out"], out, rtol=1e-4, atol=1e-5)


def test_rope_scores_depend_on_relative_position():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8))
  def score(i, j):
    qs = model_core.rope(jnp.tile(q, (1, 10, 1, 1)), 10000.0)[0, i, 0]
    ks = model_core.rope(jnp.tile(k, (1, 10, 1, 1)), 10000.0)[0, j, 0]
    return float(qs @ ks)
  assert score(5, 3) == pytest.approx(score(7, 5), rel=1e-5)
  assert score(5, 3) != pytest.approx(score(5, 4), rel=1e-3)


def test_label_padding_behaves_like_fewer_outputs(setup):
  _, x, y, _ = setup
  big = dataclasses.replace(SPEC, front=dataclasses.replace(SPEC.front, num_labels=9))
  p5, p9 = model_lib.init_params(SPEC, 0), model_lib.init_params(big, 0)
  np.testing.assert_array_equal(p9["embed_y"]["embedding"][:5], p5["embed_y"]["embedding"])
  np.testing.assert_array_equal(p9["unembed"]["kernel"][:, :5], p5["unembed"]["kernel"])
  l5, _ = fewshot.apply(SPEC, p5, x, y, 5)
  l9, _ = fewshot.apply(big, p9, x, y, 5)
  # Different programs (5 and 9 outputs): XLA CPU may vectorise the unembedding
  # product differently for the two shapes and for different instruction sets
  # (AVX2 without AVX-512 rounds 32 of these 45 logits one float32 step apart,
  # 2.4e-7 absolute). A length-16 float32 dot reordered differs by at most
  # ~16 ulp of its largest partial sum (|logit| < 3 here), so 2e-6 absolute
  # bounds reordering and still fails on any real change of the logits.
  np.testing.assert_allclose(np.asarray(l9)[..., :5], np.asarray(l5), rtol=0, atol=2e-6)
  assert np.all(np.isneginf(np.asarray(l9)[..., 5:]))


def test_init_distributions():
  spec = fewshot.model_spec(num_layers=1, num_heads=4, d_model=64, num_labels=200,
                            context_len=2, input_dim=512)
  p = model_lib.init_params(spec, 0)
  e = np.asarray(p["embed_y"]["embedding"])
  # N(0, 0.02^2) truncated at +-2 sigma: std 0.02 * 0.8796, values within 0.04.
  assert abs(e.std() - 0.02 * 0.87962566) < 0.0005 and np.abs(e).max() <= 0.04 + 1e-7
  u = np.asarray(p["unembed"]["kernel"])
  assert abs(u.std() - 1 / 8) < 0.005  # LeCun normal, fan_in 64
  assert np.all(np.asarray(p["unembed"]["bias"]) == 0)
  w = np.asarray(p["embed_x"]["kernel"])
  assert abs(w.std() - 512 ** -0.5) < 0.002


SITES = [("embed",), ("layer_0", "resid_pre"), ("layer_0", "attn", "q"), ("layer_0", "attn", "v"),
         ("layer_1", "attn", "scores"), ("layer_1", "attn", "pattern"), ("layer_1", "attn", "z"),
         ("layer_1", "attn", "out"), ("layer_1", "resid_post"), ("logits",)]


def _tree(path, leaf):
  t = leaf
  for k in reversed(path):
    t = {k: t}
  return t


def _get(acts, path):
  for k in path:
    acts = acts[k]
  return acts


@pytest.mark.parametrize("path", SITES)
def test_all_false_mask_is_bitwise_no_clamp(setup, path):
  params, x, y, fwd = setup
  ref_logits, ref = fwd(params, x, y, None)
  shape = _get(ref, path).shape
  c = _tree(path, Clamp(jnp.full(shape, 7.0), jnp.zeros(shape, bool)))
  logits, acts = fwd(params, x, y, c)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref_logits))


@pytest.mark.parametrize("path", SITES)
def test_clamped_node_equals_value_and_blocks_gradient(setup, path):
  params, x, y, fwd = setup
  _, ref = fwd(params, x, y, None)
  shape = _get(ref, path).shape
  value = jax.random.uniform(jax.random.PRNGKey(3), shape)
  c = _tree(path, Clamp(value, jnp.ones(shape, bool)))
  _, acts = fwd(params, x, y, c)
  np.testing.assert_array_equal(np.asarray(_get(acts, path)), np.asarray(value))

  # The gradient of a function of the clamped node reaches nothing upstream of it.
  def f(p):
    _, a = fewshot.apply(SPEC, p, x, y, 5, c)
    return jnp.sum(_get(a, path) ** 2)
  g = jax.grad(f)(params)
  assert all(float(jnp.max(jnp.abs(l))) == 0.0 for l in jax.tree.leaves(g))


def test_partial_mask_gradient_flows_only_through_unclamped_heads(setup):
  params, x, y, _ = setup
  mask = jnp.zeros((1, 1, 2, 1), bool).at[:, :, 0].set(True)  # head 0 of layer 1 ablated
  c = {"layer_1": {"attn": {"z": Clamp(jnp.zeros(()), mask)}}}
  def loss(p, c):
    logits, _ = fewshot.apply(SPEC, p, x, y, 5, c)
    return jnp.sum(logits[:, -1] ** 2)
  g = jax.grad(loss)(params, c)
  w_o = np.asarray(g["layer_1"]["attn"]["w_o"])
  assert np.all(w_o[0] == 0) and np.any(w_o[1] != 0)
  w_v = np.asarray(g["layer_1"]["attn"]["w_v"])
  assert np.all(w_v[:, 0] == 0) and np.any(w_v[:, 1] != 0)
  # Unclamped upstream parameters still train.
  assert np.any(np.asarray(g["layer_0"]["attn"]["w_q"]) != 0)


def test_different_masks_in_one_vmapped_call_match_separate_calls(setup):
  params, x, y, fwd = setup
  masks = jnp.stack([jnp.zeros((1, 1, 2, 1), bool),
                     jnp.zeros((1, 1, 2, 1), bool).at[:, :, 1].set(True)])
  c = {"layer_1": {"attn": {"z": Clamp(jnp.zeros((2,)), masks)}}}
  vfwd = jax.jit(jax.vmap(lambda cl: fewshot.apply(SPEC, params, x, y, 5, cl)[0]))
  both = vfwd(c)
  for i in range(2):
    # Bitwise: a run's result does not depend on what its neighbours clamp.
    alone = vfwd(jax.tree.map(lambda a: jnp.stack([a[i], a[i]]), c))
    np.testing.assert_array_equal(np.asarray(both[i]), np.asarray(alone[0]))
    # Against an unvmapped call, XLA's CPU code may vectorise differently for a
    # different run count (last-bit differences; see README, Determinism).
    one = fwd(params, x, y, jax.tree.map(lambda a: a[i], c))[0]
    np.testing.assert_allclose(np.asarray(both[i]), np.asarray(one), rtol=1e-6, atol=1e-6)
