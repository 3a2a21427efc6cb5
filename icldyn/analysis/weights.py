"""Weight-based progress measures of the attention-only transformer.

This module owns measures computed from parameters alone (no data): the
per-head QK and OV circuits, composition scores between heads of different
layers, how K-composition is spread over the singular directions of the
earlier head's OV circuit, and the OV copying score of label heads.

Conventions (docs/interfaces.md): a residual vector is a row `x [d]`; head
`h` of a layer has `W_QK^h = w_q[:, h] @ w_k[:, h].T` (scores
`x_i W_QK x_j^T`, query `i`, key `j`) and `W_OV^h = w_v[:, h] @ w_o[h]`
(writes `x W_OV`). Every function takes one run's params (no run axis) and
is written in `jax.numpy` around a jitted core per layer (or layer pair),
so callers can `jax.vmap` it over runs, and models of one shape share one
compiled program whichever layers are asked for.

LayerNorm (and RoPE, and positional embeddings) are ignored, as in Elhage
et al. 2021: the scores describe the linear circuits that LayerNorm rescales,
so they are approximate for models with `model.layer_norm`.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from icldyn.analysis import host_linalg

__all__ = [
    'qk_ov',
    'layer_indices',
    'composition_baseline',
    'composition_scores',
    'k_composition_svd_shares',
    'ov_copying_score',
]

Params = Mapping[str, Any]

# Analysis numbers should not move with the accelerator's default matmul
# precision (TF32 on recent NVIDIA GPUs).
_HI = jax.lax.Precision.HIGHEST
_LAYER = re.compile(r'layer_(\d+)$')


def _unwrap(params: Params) -> Params:
  """Accepts `{'params': tree}` as well as the tree itself."""
  if 'params' in params and not any(_LAYER.match(k) for k in params):
    return params['params']
  return params


def layer_indices(params: Params) -> list[int]:
  """Indices `l` of the `layer_{l}` subtrees that hold attention, ascending."""
  params = _unwrap(params)
  return sorted(int(m.group(1)) for k in params
                if (m := _LAYER.match(k)) and 'attn' in params[k])


def _attn(params: Params, layer: int) -> Mapping[str, jax.Array]:
  """The `attn` subtree of the `layer`-th attention layer (negative: from
  the last)."""
  layers = layer_indices(params)
  return _unwrap(params)[f'layer_{layers[layer]}']['attn']


@jax.jit
def _qk_ov_attn(a: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """`qk_ov` of one `attn` subtree."""
  w_qk = jnp.einsum('dhe,fhe->hdf', a['w_q'], a['w_k'], precision=_HI)
  w_ov = jnp.einsum('dhe,hef->hdf', a['w_v'], a['w_o'], precision=_HI)
  return w_qk, w_ov


def qk_ov(params: Params, layer: int) -> tuple[jax.Array, jax.Array]:
  """Per-head QK and OV circuits of one layer.

  Args:
    params: one run's params (layout in docs/interfaces.md).
    layer: layer index; negative counts from the last.

  Returns:
    `(W_QK [H, d, d], W_OV [H, d, d])` with
    `W_QK[h] = w_q[:, h] @ w_k[:, h].T` and `W_OV[h] = w_v[:, h] @ w_o[h]`.
  """
  return _qk_ov_attn(_attn(params, layer))


def _factors(a: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-head factors of one layer's circuits, heads first.

  Returns:
    `q, k, v [H, d, dh]` (columns of `w_q, w_k, w_v` for head h) and
    `o [H, dh, d]`, so `W_QK = q k^T` and `W_OV = v o`.
  """
  return {
      'q': jnp.moveaxis(a['w_q'], 1, 0),
      'k': jnp.moveaxis(a['w_k'], 1, 0),
      'v': jnp.moveaxis(a['w_v'], 1, 0),
      'o': a['w_o'],
  }


def _gram_cols(m: jax.Array) -> jax.Array:
  """`m^T m` for `m [..., d, a]`, giving `[..., a, a]`."""
  return jnp.einsum('...da,...db->...ab', m, m, precision=_HI)


def _gram_rows(m: jax.Array) -> jax.Array:
  """`m m^T` for `m [..., a, d]`, giving `[..., a, a]`."""
  return jnp.einsum('...ad,...bd->...ab', m, m, precision=_HI)


@functools.lru_cache(maxsize=None)
def composition_baseline(d: int, dh_early: int, dh_late: int,
                         n_samples: int | None = None, seed: int = 0) -> float:
  """Expected composition score of random circuits of the given shapes.

  Monte Carlo over `W_1 = A B` (`A [d, dh_late]`, `B [dh_late, d]`) and
  `W_2 = C D` (`C [d, dh_early]`, `D [dh_early, d]`) with i.i.d. standard
  Gaussian factors: the mean of `||W_1 W_2^T||_F / (||W_1||_F ||W_2||_F)`.
  Products of i.i.d. Gaussian matrices are invariant in distribution under
  transposition and orthogonal rotations, so this one number is the
  baseline of the Q-, K- and V-composition products alike, and the scale of
  the factors cancels. Computed with numpy (a fixed `seed`) and cached per
  shape, so it is a Python float even inside `jax.jit` / `jax.vmap`. For the
  shapes we use it comes out close to `1 / sqrt(d)` (0.248 at d=16, 0.0625
  at d=256), almost independent of the head widths.

  Args:
    d: residual width.
    dh_early: head width of the earlier layer (rank of its OV circuit).
    dh_late: head width of the later layer.
    n_samples: Monte Carlo samples; None picks `4000` for small shapes,
      down to `200` at `d = 256, dh = 64`, where one sample costs more and
      scatters less (Monte Carlo standard error below 1e-3 either way).
    seed: numpy seed.

  Returns:
    The mean random score.
  """
  if n_samples is None:
    n_samples = int(np.clip(2**25 // (d * dh_early * dh_late), 200, 4000))
  rng = np.random.default_rng(seed)
  # Chunks of about 2**22 numbers per factor keep memory flat at large d.
  chunk = max(1, 2**22 // (d * max(dh_early, dh_late)))
  scores = []
  for start in range(0, n_samples, chunk):
    n = min(chunk, n_samples - start)
    a = rng.standard_normal((n, d, dh_late))
    b = rng.standard_normal((n, dh_late, d))
    c = rng.standard_normal((n, d, dh_early))
    dd = rng.standard_normal((n, dh_early, d))
    # ||A B D^T C^T||_F^2 = tr(G^T (A^T A) G (C^T C)) with G = B D^T.
    g = b @ dd.transpose(0, 2, 1)
    ata = a.transpose(0, 2, 1) @ a
    ctc = c.transpose(0, 2, 1) @ c
    # Both Gram matrices are symmetric, so each trace is an elementwise sum.
    num = np.sum((g.transpose(0, 2, 1) @ ata @ g) * ctc, axis=(1, 2))
    n1 = np.sum(ata * (b @ b.transpose(0, 2, 1)), axis=(1, 2))
    n2 = np.sum(ctc * (dd @ dd.transpose(0, 2, 1)), axis=(1, 2))
    scores.append(np.sqrt(num / (n1 * n2)))
  return float(np.mean(np.concatenate(scores)))


@jax.jit
def _pair_raw(early: Mapping[str, jax.Array],
              late: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Raw Q/K/V composition, `[H_late, H_early]` each; see the caller.

  One compiled program per pair of layer shapes, shared by every layer pair
  of a model and by the raw and baseline-subtracted scores.
  """
  fe, fl = _factors(early), _factors(late)
  # All three products have the form X G Y with the earlier head's v_i as X
  # (K transposed: ||W_QK^j (W_OV^i)^T|| = ||W_OV^i (W_QK^j)^T||):
  #   K: W_OV^i (W_QK^j)^T = v_i (o_i k_j) q_j^T,  Y = q_j^T;
  #   Q: W_OV^i W_QK^j     = v_i (o_i q_j) k_j^T,  Y = k_j^T;
  #   V: W_OV^i W_OV^j     = v_i (o_i v_j) o_j,    Y = o_j;
  # and ||X G Y||_F^2 = tr(G^T (X^T X) G (Y Y^T)) needs only [dh, dh]
  # Gram matrices, never a [d, d] product.
  reads = jnp.stack([fl['k'], fl['q'], fl['v']])          # [3, Hl, d, dl]
  y_gram = jnp.stack([_gram_cols(fl['q']), _gram_cols(fl['k']),
                      _gram_rows(fl['o'])])               # [3, Hl, dl, dl]
  x_gram = _gram_cols(fe['v'])                            # [He, de, de]
  g = jnp.einsum('iad,sjdb->sjiab', fe['o'], reads, precision=_HI)
  # With both Gram matrices symmetric the trace is sum((X^T X G) * (G Y Y^T)).
  xg = jnp.einsum('iac,sjicb->sjiab', x_gram, g, precision=_HI)
  gy = jnp.einsum('sjiac,sjcb->sjiab', g, y_gram, precision=_HI)
  sq = jnp.sum(xg * gy, axis=(-2, -1))                    # [3, Hl, He]
  # Frobenius norms of the circuits themselves, the same way.
  ov_e = jnp.einsum('hab,hba->h', x_gram, _gram_rows(fe['o']), precision=_HI)
  qk_l = jnp.einsum('hab,hba->h', y_gram[0], y_gram[1], precision=_HI)
  ov_l = jnp.einsum('hab,hba->h', _gram_cols(fl['v']), y_gram[2],
                    precision=_HI)
  norm_l = jnp.sqrt(jnp.stack([qk_l, qk_l, ov_l]))        # [3, Hl]
  scores = jnp.sqrt(sq) / (norm_l[:, :, None] * jnp.sqrt(ov_e)[None, None])
  return {'k': scores[0], 'q': scores[1], 'v': scores[2]}


def _pair_scores(early: Mapping[str, jax.Array], late: Mapping[str, jax.Array],
                 subtract_baseline: bool) -> dict[str, jax.Array]:
  """`_pair_raw`, less the random baseline of its shapes if asked."""
  scores = _pair_raw(early, late)
  if subtract_baseline:
    d, _, dh_e = early['w_v'].shape
    base = composition_baseline(int(d), int(dh_e), int(late['w_v'].shape[2]))
    scores = {n: v - base for n, v in scores.items()}
  return scores


def composition_scores(params: Params, layers: tuple[int, int] | None = None,
                       subtract_baseline: bool = True):
  """Q-, K- and V-composition scores between heads of two layers.

  Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits",
  score how much a later head reads what an earlier head writes by
  `||W_later-side product||_F / (||W_late||_F ||W_early||_F)`. In the
  row-vector convention (earlier head `i` writes `y = x W_OV^i`; later head
  `j` scores `x_q W_QK^j x_k^T` and writes `x W_OV^j`), the products are:

  * K-composition (`y` feeds the later head's keys,
    `x_q W_QK^j (x_k W_OV^i)^T`): `||W_QK^j (W_OV^i)^T|| /
    (||W_QK^j|| ||W_OV^i||)` -- the induction-head mechanism;
  * Q-composition (`y` feeds its queries, `(x_q W_OV^i) W_QK^j x_k^T`):
    `||W_OV^i W_QK^j|| / (||W_QK^j|| ||W_OV^i||)`;
  * V-composition (`y` feeds its values, `(x W_OV^i) W_OV^j`):
    `||W_OV^i W_OV^j|| / (||W_OV^j|| ||W_OV^i||)`.

  Each score lies in `[0, 1]`. With `subtract_baseline`, the expected score
  of random low-rank circuits of the same shapes (`composition_baseline`)
  is subtracted, so independent random weights score about 0 and circuits
  in orthogonal subspaces score about `-baseline`. Norms are computed from
  `[dh, dh]` Gram matrices of the factors, never forming `[d, d]` products.

  Args:
    params: one run's params (layout in docs/interfaces.md).
    layers: `(l_early, l_late)`; None means every pair `l_early < l_late`.
    subtract_baseline: subtract the random-circuit baseline.

  Returns:
    If `layers` is given, or the model has exactly two layers: `{'q', 'k',
    'v'}`, each `[H_late, H_early]` (row: later head, column: earlier head).
    Otherwise `{(l_early, l_late): {'q', 'k', 'v'}}` over all pairs.
  """
  all_layers = layer_indices(params)
  if layers is not None:
    return _pair_scores(_attn(params, layers[0]), _attn(params, layers[1]),
                        subtract_baseline)
  if len(all_layers) < 2:
    raise ValueError('composition needs at least two attention layers, '
                     f'found {all_layers}')
  if len(all_layers) == 2:
    return _pair_scores(_attn(params, 0), _attn(params, 1), subtract_baseline)
  return {(all_layers[e], all_layers[l]):
              _pair_scores(_attn(params, e), _attn(params, l),
                           subtract_baseline)
          for l in range(len(all_layers)) for e in range(l)}


def k_composition_svd_shares(
    params: Params, layers: tuple[int, int] = (0, 1)
) -> jax.Array:
  """Share of each head pair's K-composition per earlier OV singular direction.

  Following Merullo et al. 2024, "Talking Heads: Understanding Inter-layer
  Communication in Transformer Language Models" (earlier heads talk to later
  ones through low-rank subspaces): write the earlier head's
  `W_OV^i = sum_r s_r u_r v_r^T` (SVD, `u_r` read from the residual stream,
  `v_r` written to it, `s_1 >= s_2 >= ...`). The K-composition product
  `W_QK^j (W_OV^i)^T` splits into `sum_r s_r (W_QK^j v_r) u_r^T`, and since
  the `u_r` are orthonormal these terms are Frobenius-orthogonal:

    `||W_QK^j (W_OV^i)^T||_F^2 = sum_r s_r^2 ||W_QK^j v_r||^2`.

  The share of component `r` is `s_r^2 ||W_QK^j v_r||^2` over that sum, so
  the shares are non-negative and sum to exactly 1 (NaN where the product is
  zero). Only the first `dh_early` components are kept: `W_OV^i` has rank at
  most `dh_early`, so the rest carry nothing.

  Args:
    params: one run's params.
    layers: `(l_early, l_late)`.

  Returns:
    `[H_late, H_early, dh_early]` shares, components in order of decreasing
    singular value.
  """
  early = layer_indices(params)[layers[0]]
  s, dirs = ov_directions(params, [early])
  return shares_from_directions(s[0], dirs[0], _attn(params, layers[1]))


def ov_directions(params, layers: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """Singular values and output directions of the OV circuit of every head of `layers`.

  With `W_OV = v o = sum_r s_r u_r w_r^T`, the SVD is taken through thin QR
  factors, `v = Q_v R_v`, `o^T = Q_o R_o`, so `W_OV = Q_v (R_v R_o^T) Q_o^T`
  and only the `[dh, dh]` core is decomposed: `w_r = Q_o V[:, r]` from
  `svd(R_v R_o^T) = U S V^T`. (A `[d, d]` SVD per head would dominate the
  analysis on a CPU.) The core is formed as `(Q_v^T v)(Q_o^T o^T)^T`, which
  equals `R_v R_o^T`. QR and SVD run on the host (`host_linalg`: jaxlib's
  batched CPU LAPACK kernels can deadlock).

  Args:
    params: one run's params.
    layers: layer indices.

  Returns:
    (s [len(layers), H, dh] descending, w [len(layers), H, dh, d]).
  """
  params = _unwrap(params)
  v = jnp.stack([jnp.moveaxis(params[f"layer_{l}"]["attn"]["w_v"], 1, 0) for l in layers])
  o_t = jnp.stack([jnp.swapaxes(params[f"layer_{l}"]["attn"]["w_o"], 1, 2) for l in layers])
  a = jnp.stack([v, o_t])                                          # [2, n, H, d, dh]
  q = host_linalg.qr_q(a)
  r = jnp.einsum("xnhda,xnhdb->xnhab", q, a, precision=_HI)        # Q^T a = R
  core = jnp.einsum("nhab,nhcb->nhac", r[0], r[1], precision=_HI)  # R_v R_o^T
  _, s, vh = host_linalg.svd(core)
  dirs = jnp.einsum("nhdb,nhrb->nhrd", q[1], vh, precision=_HI)   # w_r = Q_o V[:, r]
  return s, dirs


def shares_from_directions(s: jax.Array, dirs: jax.Array, late) -> jax.Array:
  """K-composition share per singular component (Merullo et al.), for one layer pair.

  Component r of earlier head i carries `s_r^2 ||W_QK^j w_r||^2` of
  `||W_QK^j (W_OV^i)^T||_F^2 = sum_r s_r^2 ||W_QK^j w_r||^2` (the u_r are
  orthonormal); what `k_composition_svd_shares` returns.

  Args:
    s: [H_early, dh] singular values of the earlier heads' OV circuits.
    dirs: [H_early, dh, d] their output directions w_r.
    late: the later layer's `attn` params.

  Returns:
    [H_late, H_early, dh] shares (sum 1 over the last axis; NaN where the
    product is zero), components by decreasing singular value.
  """
  q = jnp.moveaxis(late["w_q"], 1, 0)                              # [Hl, d, dl]
  k = jnp.moveaxis(late["w_k"], 1, 0)
  kw = jnp.einsum("jda,ird->jira", k, dirs, precision=_HI)         # k_j^T w_r
  qtq = jnp.einsum("jda,jdb->jab", q, q, precision=_HI)
  read = jnp.einsum("jira,jab,jirb->jir", kw, qtq, kw, precision=_HI)
  contrib = (s ** 2)[None] * read
  return contrib / jnp.sum(contrib, axis=-1, keepdims=True)


def ov_copying_score(params: Params, layer: int = -1, num_labels: int | None = None,
                     embedding: tuple[str, str] = ('embed_y', 'embedding')) -> jax.Array:
  """Copying score of each head's OV circuit on the tokens that hold outputs.

  With `E = embed_y/embedding[:num_labels]` (`[L, d]`; the parameter at
  `embedding`, the task front end's `output_embedding`: label embeddings in
  the few-shot task, token embeddings in the token task) and
  `W_U = unembed/kernel[:, :num_labels]` (`[d, L]`), head `h`'s label-to-
  logit map is `M_h = E W_OV^h W_U` (`[L, L]`; row `a`: attending to a token
  of label `a`, column `b`: logit of label `b`). The score is Elhage et al.
  2021's copying score, `sum_k lambda_k / sum_k |lambda_k|` over the
  eigenvalues of `M_h`, in `[-1, 1]`: 1 when `M_h` only amplifies each label
  into itself (eigenvalues positive), -1 when it suppresses it, about 0 for
  a map that moves labels to other labels. The numerator is `tr(M_h)` (real:
  complex eigenvalues come in conjugate pairs). The eigenvalues are taken
  of whichever of `M_h = (E v_h)(o_h W_U)` and `(o_h W_U)(E v_h)`
  (`[dh, dh]`) is smaller; the two share their non-zero eigenvalues.
  Positional embeddings and LayerNorm are ignored.

  Args:
    params: one run's params.
    layer: layer index; negative counts from the last (the induction layer).
    num_labels: only the first `num_labels` outputs (those in use); None for
      the whole output capacity `L`.
    embedding: (module, parameter) of the output embedding.

  Returns:
    `[H]` scores; NaN for a head whose `M_h` is zero.
  """
  p = _unwrap(params)
  return _copying_attn(_attn(params, layer), p[embedding[0]][embedding[1]],
                       p['unembed']['kernel'], num_labels)


@functools.partial(jax.jit, static_argnames='num_labels')
def _copying_attn(a: Mapping[str, jax.Array], emb: jax.Array, w_u: jax.Array,
                  num_labels: int | None) -> jax.Array:
  """`ov_copying_score` of one `attn` subtree, `emb [L, d]`, `w_u [d, L]`."""
  emb = emb[:num_labels]                                           # [L, d]
  w_u = w_u[:, :num_labels]                                        # [d, L]
  left = jnp.einsum('ld,dhe->hle', emb, a['w_v'], precision=_HI)   # [H, L, dh]
  right = jnp.einsum('hed,dl->hel', a['w_o'], w_u, precision=_HI)  # [H, dh, L]
  n_labels, dh = left.shape[1], left.shape[2]
  if n_labels <= dh:
    m = jnp.einsum('hle,hem->hlm', left, right, precision=_HI)
  else:
    m = jnp.einsum('hel,hlf->hef', right, left, precision=_HI)
  eig = host_linalg.eigvals(m)  # on the host: see host_linalg
  return jnp.real(jnp.sum(eig, axis=-1)) / jnp.sum(jnp.abs(eig), axis=-1)
