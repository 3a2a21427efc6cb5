"""Host (numpy) linear algebra under jit and vmap: same results as jnp.linalg."""

import jax
import jax.numpy as jnp
import numpy as np

from icldyn.analysis import host_linalg


def _stack(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_svd_vmapped_matches_jnp_and_reconstructs():
  a = _stack(0, (3, 4, 16, 8))
  u, s, vh = jax.jit(jax.vmap(host_linalg.svd))(a)
  assert u.shape == (3, 4, 16, 8) and s.shape == (3, 4, 8) and vh.shape == (3, 4, 8, 8)
  # float32 SVD of well-conditioned 16x8 Gaussian matrices: ~1e-6 relative.
  np.testing.assert_allclose(s, jnp.linalg.svd(a, compute_uv=False), rtol=1e-4)
  np.testing.assert_allclose(np.einsum("...ik,...k,...kj->...ij", u, s, vh), a, atol=1e-4)
  assert np.all(np.diff(np.asarray(s), axis=-1) <= 0)


def test_qr_q_is_orthonormal_and_spans_a():
  a = _stack(1, (5, 12, 4))
  q = jax.jit(jax.vmap(host_linalg.qr_q))(a)
  assert q.shape == (5, 12, 4)
  np.testing.assert_allclose(np.einsum("bij,bik->bjk", q, q), np.broadcast_to(np.eye(4), (5, 4, 4)),
                             atol=1e-5)
  # a lies in the span of Q: projecting onto it changes nothing.
  np.testing.assert_allclose(np.einsum("bij,bkj,bkl->bil", q, q, a), a, atol=1e-4)


def test_eigvals_complex_and_real_spectra():
  rot = np.array([[0.0, -1.0], [1.0, 0.0]], np.float32)  # eigenvalues +-i
  diag = np.diag([3.0, -2.0]).astype(np.float32)         # real eigenvalues: numpy returns float
  ev = jax.jit(jax.vmap(host_linalg.eigvals))(np.stack([rot, diag]))
  assert ev.dtype == jnp.complex64
  np.testing.assert_allclose(np.sort_complex(np.asarray(ev[0])), [-1j, 1j], atol=1e-6)
  np.testing.assert_allclose(np.sort_complex(np.asarray(ev[1])), [-2, 3], atol=1e-6)
  m = _stack(2, (6, 5, 5))
  got = np.sort_complex(np.asarray(jax.jit(host_linalg.eigvals)(m)))
  np.testing.assert_allclose(got, np.sort_complex(np.linalg.eigvals(m.astype(np.float64))), atol=1e-4)
