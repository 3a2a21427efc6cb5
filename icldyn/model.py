"""The attention-only transformer of Singh et al. 2024 (arXiv 2404.07129), in Flax linen.

Tokens interleave exemplars and labels, `[x_1, y_1, ..., x_C, y_C, x_q]`.
The forward pass returns the logits at exemplar positions and every
intermediate activation under the names of docs/interfaces.md, and takes an
optional clamp tree mirroring those activations.

Model details follow the paper's code, since phase-change timing depends on
them: pre-LayerNorm blocks and a final LayerNorm; no bias on q/k/v and on the
output projection; bias on the exemplar embedding and on the unembedding;
scores scaled by 1/sqrt(d_head); RoPE (base 10000) on q and k over each
head's dimensions; LeCun-normal weights and zero biases; label embedding from
a normal truncated at +-2 sigma with sigma = 0.02; no weight decay.

Differences, and why: (1) label embedding rows and unembedding columns are
drawn per label from `fold_in(key, label)` (same distribution), so that a run
with K labels padded to a larger label capacity in a grid starts from exactly
the parameters it has alone; (2) logits of labels >= the run's `num_labels`
are -inf, which makes the padded model behave as a K-output model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from icldyn.clamps import apply_clamp

_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Static model shape; hashable so it can key a compilation.

  Attributes:
    num_layers, num_heads, d_model: transformer size.
    num_labels: label capacity L (outputs and label embeddings).
    context_len: C pairs, so T = 2C + 1 tokens.
    input_dim: D, exemplar dimension.
    pos_embedding: 'rope' | 'sinusoidal' | 'learned'.
    layer_norm: pre-LN blocks plus a final LN.
    mlp_ratio: None for attention only, else MLP width / d_model.
    rope_base: RoPE base frequency.
  """
  num_layers: int
  num_heads: int
  d_model: int
  num_labels: int
  context_len: int
  input_dim: int
  pos_embedding: str = "rope"
  layer_norm: bool = True
  mlp_ratio: float | None = None
  rope_base: float = 10000.0

  @property
  def d_head(self) -> int:
    return self.d_model // self.num_heads

  @property
  def seq_len(self) -> int:
    return 2 * self.context_len + 1


def per_label_init(std: float, fan_axis: int, corrected: bool):
  """Truncated-normal init drawn one label at a time (label axis `fan_axis`).

  Args:
    std: the scale.
    fan_axis: the label axis of the parameter.
    corrected: if True, `std` is the standard deviation after truncation at
      +-2 (as flax's LeCun normal); if False, it is the scale of the normal
      before truncation, so values lie in [-2 std, 2 std].
  """
  def init(key, shape, dtype=jnp.float32):
    n = shape[fan_axis]
    rest = tuple(s for i, s in enumerate(shape) if i != fan_axis)
    def one(i):
      return jax.random.truncated_normal(jax.random.fold_in(key, i), -2.0, 2.0, rest, dtype)
    rows = jax.vmap(one)(jnp.arange(n, dtype=jnp.uint32))  # [n, *rest]
    return jnp.moveaxis(rows, 0, fan_axis) * (std / _TRUNC_STD if corrected else std)
  return init


def rope(x: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding over the head dimension (Su et al. 2021).

  Args:
    x: [B, T, H, dh] queries or keys.
    base: base frequency.

  Returns:
    [B, T, H, dh], pairs (x[2i], x[2i+1]) rotated by angle pos * base^(-2i/dh).
  """
  t, dh = x.shape[1], x.shape[-1]
  freq = base ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)
  ang = np.arange(t, dtype=np.float64)[:, None] * freq[None, :]  # [T, dh/2]
  cos = jnp.asarray(np.cos(ang), x.dtype)[None, :, None, :]
  sin = jnp.asarray(np.sin(ang), x.dtype)[None, :, None, :]
  x1, x2 = x[..., 0::2], x[..., 1::2]
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.reshape(x.shape)


def sinusoidal(t: int, d: int) -> np.ndarray:
  """Fixed sinusoidal positions (Vaswani et al. 2017), [T, d]."""
  pos = np.arange(t)[:, None]
  i = np.arange(0, d, 2)[None, :]
  ang = pos / (10000.0 ** (i / d))
  out = np.zeros((t, d), np.float32)
  out[:, 0::2] = np.sin(ang)
  out[:, 1::2] = np.cos(ang[:, : d // 2])
  return out


# Below this many multiply-adds per (sequence, head) the attention products run
# as broadcast-multiply-sum: XLA CPU lowers a batched dot to one tiny matrix
# product per (run, sequence, head), ~1 us each, which made the 5x8x5 products
# of the paper model 40 % of a grid step; the elementwise form fuses into a few
# loops (docs/performance.md). Larger contexts keep the dot, whose broadcast
# form would materialise [B, H, T, T, dh].
_SMALL_ATTENTION = 4096


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
  """Unscaled scores [B, H, Tq, Tk] of q, k [B, T, H, dh]."""
  t, dh = q.shape[1], q.shape[-1]
  if t * t * dh > _SMALL_ATTENTION:
    return jnp.einsum("bqhe,bkhe->bhqk", q, k)
  qh, kh = jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2)  # [B, H, T, dh]
  return jnp.sum(qh[:, :, :, None, :] * kh[:, :, None, :, :], axis=-1)


def _mix(pattern: jax.Array, v: jax.Array) -> jax.Array:
  """Head outputs z [B, T, H, dh] from pattern [B, H, T, T] and v [B, T, H, dh]."""
  t, dh = v.shape[1], v.shape[-1]
  if t * t * dh > _SMALL_ATTENTION:
    return jnp.einsum("bhqk,bkhe->bqhe", pattern, v)
  vh = jnp.swapaxes(v, 1, 2)  # [B, H, T, dh]
  z = jnp.sum(pattern[..., None] * vh[:, :, None, :, :], axis=3)  # [B, H, T, dh]
  return jnp.swapaxes(z, 1, 2)


# The exemplar embedding's weight gradient through `contract` (below); False
# gives JAX's own rule (tests compare the two). Only the embedding uses it: its
# [512, 64] weight is most of a run's parameters; on the 64x64 projections the
# change measured no gain.
_NATURAL_GRADS = True


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def contract(x: jax.Array, w: jax.Array, k: int = 1) -> jax.Array:
  """The product of a linear layer: x [..., *In] with w [*In, *Out], over the
  k dims In (x's last k, w's first k). Same forward as `jnp.tensordot`.

  Its own gradient rule writes the weight gradient straight in w's layout.
  JAX's rule for `dot_general` computes it as g^T x, [*Out, *In], and then
  transposes; XLA CPU leaves that transpose fused into each optimizer loop
  that reads the gradient, which then reads it with a stride of |In|
  (docs/performance.md).
  """
  return jnp.tensordot(x, w, axes=k)


def _contract_fwd(x, w, k):
  return contract(x, w, k), (x, w)


def _contract_bwd(k, res, g):
  x, w = res
  batch = x.ndim - k
  dx = jnp.tensordot(g, w, axes=(tuple(range(batch, g.ndim)), tuple(range(k, w.ndim))))
  dw = jnp.tensordot(x, g, axes=(tuple(range(batch)), tuple(range(batch))))
  return dx, dw


contract.defvjp(_contract_fwd, _contract_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                       preferred_element_type=None):
  """`nn.Dense`'s dot_general ([..., in] x [in, out]) through `contract`.

  `contract` takes no precision or output type, so none may be asked for
  (rather than dropping them silently).
  """
  if not _NATURAL_GRADS:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  if precision is not None or preferred_element_type is not None:
    raise ValueError("contract: precision and preferred_element_type are not supported")
  assert dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())), dimension_numbers
  return contract(lhs, rhs, 1)


class Attention(nn.Module):
  """Multi-head causal self-attention returning its intermediates."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, x: jax.Array, clamps: dict | None) -> tuple[jax.Array, dict]:
    s = self.spec
    h, dh, d = s.num_heads, s.d_head, s.d_model
    qkv_init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    w_q = self.param("w_q", qkv_init, (d, h, dh))
    w_k = self.param("w_k", qkv_init, (d, h, dh))
    w_v = self.param("w_v", qkv_init, (d, h, dh))
    w_o = self.param("w_o", nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), (h, dh, d))
    c = clamps or {}
    acts = {}

    def site(name, value):
      acts[name] = apply_clamp(value, c.get(name))
      return acts[name]

    q = jnp.einsum("btd,dhe->bthe", x, w_q)
    k = jnp.einsum("btd,dhe->bthe", x, w_k)
    if s.pos_embedding == "rope":
      q, k = rope(q, s.rope_base), rope(k, s.rope_base)
    q = site("q", q)
    k = site("k", k)
    v = site("v", jnp.einsum("btd,dhe->bthe", x, w_v))
    t = x.shape[1]
    causal = np.tril(np.ones((t, t), bool))
    scores = _scores(q, k) / np.sqrt(dh).astype(np.float32)
    if "temperature" in c:
      # Per-head temperature [1, H, 1, 1] (1 unless clamped): a site only when
      # clamped, so the unclamped program is unchanged; x / 1 is exact.
      scores = scores / site("temperature", jnp.ones((1, h, 1, 1), scores.dtype))
    scores = site("scores", jnp.where(causal, scores, -jnp.inf))
    pattern = site("pattern", jax.nn.softmax(scores, axis=-1))
    z = site("z", _mix(pattern, v))
    out = site("out", jnp.einsum("bqhe,hed->bqd", z, w_o))
    return out, acts


class Block(nn.Module):
  """Pre-LN attention block (plus an optional MLP)."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, resid: jax.Array, clamps: dict | None) -> tuple[jax.Array, dict]:
    c = clamps or {}
    resid = apply_clamp(resid, c.get("resid_pre"))
    acts = {"resid_pre": resid}
    x = nn.LayerNorm(name="ln")(resid) if self.spec.layer_norm else resid
    out, acts["attn"] = Attention(self.spec, name="attn")(x, c.get("attn"))
    resid = resid + out
    if self.spec.mlp_ratio:
      width = int(round(self.spec.mlp_ratio * self.spec.d_model))
      y = nn.LayerNorm(name="ln_mlp")(resid) if self.spec.layer_norm else resid
      y = nn.Dense(width, name="mlp_in")(y)
      y = nn.Dense(self.spec.d_model, name="mlp_out")(jax.nn.gelu(y))
      y = apply_clamp(y, c.get("mlp_out"))
      acts["mlp_out"] = y
      resid = resid + y
    acts["resid_post"] = apply_clamp(resid, c.get("resid_post"))
    return acts["resid_post"], acts


class Transformer(nn.Module):
  """The attention-only transformer over interleaved exemplar-label tokens."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, inputs: jax.Array, labels: jax.Array, num_labels: jax.Array,
               clamps: dict | None = None, table_rows=None) -> tuple[jax.Array, dict[str, Any]]:
    """Runs the model.

    Args:
      inputs: [B, C+1, D] exemplars, the query last.
      labels: [B, C+1] int labels; the last (the query's target) is not read.
      num_labels: [] int, the run's label count; larger labels get -inf logits.
      clamps: optional clamp tree mirroring the activations.
      table_rows: optional `data.TableRows` with `inputs == x[index]`. The
        exemplar embedding is linear, so it is computed on the R rows and
        gathered: the same values up to float rounding, and half the
        embedding work or less when R < B (C+1) (the paper's task: 50 rows
        against 96 tokens per batch of 32); `inputs` is then not read.

    Returns:
      logits [B, C+1, L] at exemplar positions, and the activation tree.
    """
    s = self.spec
    c = clamps or {}
    b, n, _ = inputs.shape
    embed_x = nn.Dense(s.d_model, name="embed_x", kernel_init=nn.initializers.lecun_normal(),
                       bias_init=nn.initializers.zeros, dot_general=_dense_dot_general)
    if table_rows is None:
      ex = embed_x(inputs)  # [B, C+1, d]
    else:
      ex = embed_x(table_rows.x)[table_rows.index]  # [R, d] -> [B, C+1, d]
    lab = nn.Embed(s.num_labels, s.d_model, name="embed_y",
                   embedding_init=per_label_init(0.02, 0, corrected=False))(labels[:, :-1])  # [B, C, d]
    pairs = jnp.stack([ex[:, :-1], lab], axis=2).reshape(b, 2 * (n - 1), s.d_model)
    tokens = jnp.concatenate([pairs, ex[:, -1:]], axis=1)  # [B, T, d]
    if s.pos_embedding == "sinusoidal":
      tokens = tokens + sinusoidal(s.seq_len, s.d_model)[None]
    elif s.pos_embedding == "learned":
      pos = self.param("pos", nn.initializers.normal(0.02), (s.seq_len, s.d_model))
      tokens = tokens + pos[None]
    resid = apply_clamp(tokens, c.get("embed"))
    acts: dict[str, Any] = {"embed": resid}
    for layer in range(s.num_layers):
      name = f"layer_{layer}"
      resid, acts[name] = Block(s, name=name)(resid, c.get(name))
    final = nn.LayerNorm(name="ln_final")(resid) if s.layer_norm else resid
    acts["resid_final"] = final
    logits = nn.Dense(s.num_labels, name="unembed",
                      kernel_init=per_label_init(1.0 / np.sqrt(s.d_model), 1, corrected=True),
                      bias_init=nn.initializers.zeros)(final[:, 0::2])  # [B, C+1, L]
    logits = jnp.where(jnp.arange(s.num_labels) < num_labels, logits, -jnp.inf)
    logits = apply_clamp(logits, c.get("logits"))
    acts["logits"] = logits
    return logits, acts


def init_params(spec: ModelSpec, seed: jax.Array) -> dict:
  """Parameters of one run from its init seed (jit- and vmap-friendly)."""
  model = Transformer(spec)
  b, n = 1, spec.context_len + 1
  dummy_x = jnp.zeros((b, n, spec.input_dim), jnp.float32)
  dummy_y = jnp.zeros((b, n), jnp.int32)
  return model.init(jax.random.PRNGKey(seed), dummy_x, dummy_y, spec.num_labels)["params"]


def apply(spec: ModelSpec, params: dict, inputs: jax.Array, labels: jax.Array,
          num_labels: jax.Array, clamps: dict | None = None,
          table_rows=None) -> tuple[jax.Array, dict]:
  """Pure forward pass: `(logits [B, C+1, L], acts)` (see `Transformer.__call__`)."""
  return Transformer(spec).apply({"params": params}, inputs, labels, num_labels, clamps,
                                 table_rows)
