"""Tests for icldyn.analysis.weights: circuits, composition, copying."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icldyn.analysis import weights

D, H, DH, L = 16, 2, 8, 5


def _zeros(n_layers=2, d=D, h=H, dh=DH, n_labels=L):
  """Numpy params tree of zeros in the documented layout."""
  p = {
      'embed_y': {'embedding': np.zeros((n_labels, d), np.float32)},
      'unembed': {'kernel': np.zeros((d, n_labels), np.float32),
                  'bias': np.zeros((n_labels,), np.float32)},
  }
  for l in range(n_layers):
    p[f'layer_{l}'] = {'attn': {
        'w_q': np.zeros((d, h, dh), np.float32),
        'w_k': np.zeros((d, h, dh), np.float32),
        'w_v': np.zeros((d, h, dh), np.float32),
        'w_o': np.zeros((h, dh, d), np.float32),
    }}
  return p


def _random(seed, n_layers=2, d=D, h=H, dh=DH, n_labels=L, runs=None):
  """Params with i.i.d. standard normal leaves (numpy draws: fast to make).

  With `runs`, every leaf gets a leading run axis `[runs, ...]`.
  """
  rng = np.random.default_rng(seed)
  lead = () if runs is None else (runs,)
  return jax.tree.map(
      lambda a: jnp.asarray(rng.standard_normal(lead + a.shape), jnp.float32),
      _zeros(n_layers, d, h, dh, n_labels))


def _fro(m):
  return np.linalg.norm(np.asarray(m, np.float64))


def test_qk_ov_follow_the_row_convention():
  p = _random(0)
  w_qk, w_ov = weights.qk_ov(p, 1)
  a = jax.tree.map(np.asarray, p['layer_1']['attn'])
  for h in range(H):
    np.testing.assert_allclose(w_qk[h], a['w_q'][:, h] @ a['w_k'][:, h].T,
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(w_ov[h], a['w_v'][:, h] @ a['w_o'][h],
                               rtol=1e-5, atol=1e-4)
  # Negative layer counts from the last.
  np.testing.assert_array_equal(weights.qk_ov(p, -1)[0], w_qk)


def test_composition_matches_direct_formula():
  p = _random(1)
  qk1, ov1 = (np.asarray(m, np.float64) for m in weights.qk_ov(p, 1))
  _, ov0 = (np.asarray(m, np.float64) for m in weights.qk_ov(p, 0))
  raw = weights.composition_scores(p, subtract_baseline=False)
  sub = weights.composition_scores(p)
  base = weights.composition_baseline(D, DH, DH)
  for j in range(H):        # later head
    for i in range(H):      # earlier head
      norms = _fro(qk1[j]) * _fro(ov0[i])
      want = {
          'k': _fro(qk1[j] @ ov0[i].T) / norms,
          'q': _fro(ov0[i] @ qk1[j]) / norms,
          'v': _fro(ov0[i] @ ov1[j]) / (_fro(ov1[j]) * _fro(ov0[i])),
      }
      for name, w in want.items():
        assert raw[name][j, i] == pytest.approx(w, rel=1e-4)
        assert sub[name][j, i] == pytest.approx(w - base, abs=1e-5)


def _one_hot_heads():
  """Earlier head 0 reads dim 15, writes dim 0 (a rank-1 OV circuit)."""
  p = _zeros()
  e = p['layer_0']['attn']
  e['w_v'][15, 0, 0] = 1.0
  e['w_o'][0, 0, 0] = 2.0
  # Earlier head 1 exists but writes nothing.
  return p


@pytest.mark.parametrize('reader', ['k', 'q', 'v'])
def test_hand_built_composition_is_read_by_the_right_side(reader):
  # Later head 0 reads dim 0 (where the earlier head writes) through exactly
  # one of its key, query or value maps, and dims 1 / 2 through the others,
  # so only one composition score may be high. Swapping W_QK for its
  # transpose, or the product order, moves the high score elsewhere.
  p = _one_hot_heads()
  l = p['layer_1']['attn']
  dims = {'k': 1, 'q': 2, 'v': 3}
  dims[reader] = 0
  l['w_k'][dims['k'], 0, 0] = 1.0
  l['w_q'][dims['q'], 0, 0] = 1.0
  l['w_v'][dims['v'], 0, 0] = 1.0
  l['w_o'][0, 0, 4] = 1.0
  # Later head 1 and earlier head 1 are zero, so their scores are 0/0.
  raw = weights.composition_scores(jax.tree.map(jnp.asarray, p),
                                   subtract_baseline=False)
  for name in 'qkv':
    # Rank-1 matrices whose directions line up compose with score exactly 1.
    want = 1.0 if name == reader else 0.0
    assert float(raw[name][0, 0]) == pytest.approx(want, abs=1e-6), name


def test_orthogonal_subspaces_sit_at_minus_baseline():
  # Earlier heads write only into dims 0..7; every read of the later layer
  # (keys, queries, values) looks only at dims 8..15.
  rng = np.random.default_rng(0)
  p = _zeros()
  e, l = p['layer_0']['attn'], p['layer_1']['attn']
  e['w_v'][...] = rng.normal(size=e['w_v'].shape)
  e['w_o'][:, :, :8] = rng.normal(size=(H, DH, 8))
  for name in ('w_q', 'w_k', 'w_v'):
    l[name][8:] = rng.normal(size=(8, H, DH))
  l['w_o'][...] = rng.normal(size=l['w_o'].shape)
  p = jax.tree.map(jnp.asarray, p)
  raw = weights.composition_scores(p, subtract_baseline=False)
  sub = weights.composition_scores(p)
  base = weights.composition_baseline(D, DH, DH)
  for name in 'qkv':
    np.testing.assert_allclose(raw[name], 0.0, atol=1e-6)
    np.testing.assert_allclose(sub[name], -base, atol=1e-6)


def test_random_weights_score_zero_after_baseline_and_vmap():
  # Independent Gaussian weights are the baseline's own model, drawn here
  # with another seed. One pair's score has sd ~0.034 at these
  # shapes; 256 runs x 4 pairs give a standard error of the mean ~0.0011
  # (~0.002 allowing for pairs sharing heads), plus the baseline's Monte
  # Carlo error ~0.0004. 0.01 is ~5 of those; without the subtraction the
  # mean would be ~0.25.
  params = _random(2, runs=256)
  scores = jax.vmap(weights.composition_scores)(params)
  for name in 'qkv':
    assert scores[name].shape == (256, H, H)
    assert abs(float(jnp.mean(scores[name]))) < 0.01, name
  # The baseline itself: close to 1 / sqrt(d) for these shapes.
  base = weights.composition_baseline(D, DH, DH)
  assert base == pytest.approx(0.25, abs=0.01)


def test_more_layers_give_every_pair():
  p = _random(3, n_layers=3)
  out = weights.composition_scores(p)
  assert sorted(out) == [(0, 1), (0, 2), (1, 2)]
  one = weights.composition_scores(p, layers=(0, 2))
  np.testing.assert_allclose(out[(0, 2)]['k'], one['k'], rtol=1e-6)
  with pytest.raises(ValueError):
    weights.composition_scores(_random(4, n_layers=1))


def test_svd_shares_rank_one_puts_everything_on_the_first_component():
  p = _random(5)
  # A rank-1 earlier OV: only the first value/output dimension is used.
  p['layer_0']['attn']['w_v'] = p['layer_0']['attn']['w_v'].at[:, :, 1:].set(0)
  shares = weights.k_composition_svd_shares(p)
  assert shares.shape == (H, H, DH)
  want = np.zeros(DH)
  want[0] = 1.0
  np.testing.assert_allclose(shares, np.broadcast_to(want, shares.shape),
                             atol=1e-5)


def test_svd_shares_follow_the_written_direction():
  # W_OV = 3 e14 e0^T + 1 e15 e1^T: the larger component writes dim 0, the
  # smaller writes dim 1. Later keys read dim 1 only, so all of the
  # K-composition goes through the second component. A version that used
  # the read directions (e14, e15) would find nothing at all.
  p = _zeros()
  e, l = p['layer_0']['attn'], p['layer_1']['attn']
  e['w_v'][14, 0, 0], e['w_v'][15, 0, 1] = 1.0, 1.0
  e['w_o'][0, 0, 0], e['w_o'][0, 1, 1] = 3.0, 1.0
  l['w_k'][1, 0, 0] = 1.0
  l['w_q'][5, 0, 0] = 1.0
  shares = weights.k_composition_svd_shares(jax.tree.map(jnp.asarray, p))
  np.testing.assert_allclose(shares[0, 0, :2], [0.0, 1.0], atol=1e-6)
  # Random weights: non-negative shares that sum to 1 for every pair.
  shares = weights.k_composition_svd_shares(_random(6))
  assert bool(jnp.all(shares >= 0))
  np.testing.assert_allclose(jnp.sum(shares, -1), 1.0, rtol=1e-5)


def _copying_params(sign, n_labels=L, dh=DH):
  """Label embeddings one-hot in dims 0..L-1, unembedding their transpose,
  and every last-layer head's OV `sign` times the projection on dims
  0..dh-1."""
  p = _zeros(dh=dh, n_labels=n_labels)
  p['embed_y']['embedding'][:, :n_labels] = np.eye(n_labels)
  p['unembed']['kernel'][:n_labels, :] = np.eye(n_labels)
  a = p['layer_1']['attn']
  for h in range(H):
    a['w_v'][:dh, h, :] = np.eye(dh)
    a['w_o'][h, :, :dh] = sign * np.eye(dh)
  return jax.tree.map(jnp.asarray, p)


def test_copying_score_of_identity_and_negated_ov():
  # 12 labels, dh = 4: the [dh, dh] route, M = E W_OV W_U = diag(1,1,1,1,0..).
  # (The [L, L] route is covered by the permutation test below.)
  np.testing.assert_allclose(
      weights.ov_copying_score(_copying_params(1.0, 12, 4)), 1.0, atol=1e-5)
  np.testing.assert_allclose(
      weights.ov_copying_score(_copying_params(-1.0, 12, 4)), -1.0, atol=1e-5)


def test_copying_score_of_a_label_permutation_is_zero():
  # Head 0 maps label a to label a-1 (mod L): the label->logit map is a
  # cyclic permutation, whose eigenvalues are the L-th roots of unity
  # (trace 0), so it moves labels without copying any.
  p = _copying_params(1.0)
  perm = np.roll(np.eye(D, dtype=np.float32)[:L], 1, axis=0)  # e_a -> e_{a-1}
  w_o = np.array(p['layer_1']['attn']['w_o'])
  w_o[0, :L, :] = perm
  p['layer_1']['attn']['w_o'] = jnp.asarray(w_o)
  score = weights.ov_copying_score(p)
  assert abs(float(score[0])) < 1e-5 and float(score[1]) == pytest.approx(1.0)


def test_copying_score_matches_numpy_eigenvalues():
  # 12 labels, dh = 4: the eigenvalues come from the [dh, dh] product.
  p = _random(7, dh=4, n_labels=12)
  a = jax.tree.map(lambda x: np.asarray(x, np.float64), p['layer_1']['attn'])
  w_ov = np.einsum('dhe,hef->hdf', a['w_v'], a['w_o'])          # [H, d, d]
  m = (np.asarray(p['embed_y']['embedding'], np.float64)
       @ w_ov @ np.asarray(p['unembed']['kernel'], np.float64))  # [H, 12, 12]

  def score(mm):
    lam = np.linalg.eigvals(mm)
    return lam.real.sum(-1) / np.abs(lam).sum(-1)

  np.testing.assert_allclose(weights.ov_copying_score(p), score(m), atol=1e-4)
  # num_labels keeps the first labels only (3 < dh: the [L, L] route).
  np.testing.assert_allclose(weights.ov_copying_score(p, num_labels=3),
                             score(m[:, :3, :3]), atol=1e-4)
