"""Dense linear algebra run by numpy on the host, callable from jitted, vmapped code.

Why not `jnp.linalg`: jaxlib's CPU LAPACK kernels (0.10) split a batch over
XLA's intra-op thread pool and block a pool thread until the pieces finish.
Two such calls in flight at once on a pool of two threads (a 2-core machine)
wait for each other forever, and XLA runs independent operations of a
program concurrently, so a batched analysis program can hang (it did: the
default `icldyn analyze` of an 18-run workdir, twice). numpy's LAPACK runs on
the calling thread and OpenBLAS's own threads, outside XLA's pool, so it
cannot take part in that deadlock. The matrices here are small (at most
`[d_model, d_head]` per head), so the round trip to the host costs little on
an accelerator too, and every backend runs the same code.

Each function takes a stack of matrices `[..., m, n]` and is vmapped by
passing the vmapped axes to numpy as leading stack axes (`expand_dims`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _host(fn, out_shapes, *args):
  return jax.pure_callback(fn, out_shapes, *args, vmap_method="expand_dims")


def qr_q(a: jax.Array) -> jax.Array:
  """Q of the thin QR factorisation `a = Q R` of each `[m, n]` matrix (m >= n)."""
  *batch, m, n = a.shape
  k = min(m, n)
  out = jax.ShapeDtypeStruct((*batch, m, k), a.dtype)
  return _host(lambda x: np.linalg.qr(np.asarray(x), mode="reduced")[0].astype(x.dtype),
               out, a)


def svd(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Thin SVD `a = U diag(s) Vh` of each `[m, n]` matrix; s descending."""
  *batch, m, n = a.shape
  k = min(m, n)
  out = (jax.ShapeDtypeStruct((*batch, m, k), a.dtype),
         jax.ShapeDtypeStruct((*batch, k), a.dtype),
         jax.ShapeDtypeStruct((*batch, k, n), a.dtype))

  def host(x):
    u, s, vh = np.linalg.svd(np.asarray(x), full_matrices=False)
    return u.astype(x.dtype), s.astype(x.dtype), vh.astype(x.dtype)

  return _host(host, out, a)


def eigvals(a: jax.Array) -> jax.Array:
  """Eigenvalues of each square `[n, n]` matrix, as complex numbers (any order)."""
  *batch, n, _ = a.shape
  cdtype = jnp.result_type(a.dtype, jnp.complex64)
  out = jax.ShapeDtypeStruct((*batch, n), cdtype)
  # numpy returns a real array when every eigenvalue is real: cast either way.
  return _host(lambda x: np.linalg.eigvals(np.asarray(x)).astype(cdtype), out, a)
