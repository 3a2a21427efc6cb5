"""The transformer core shared by every task, in Flax linen.

The core is the residual stream, the blocks (pre-LayerNorm causal
self-attention, an optional MLP), the final LayerNorm and the unembedding. A
task supplies the rest through its *front end* (`ModelSpec.front`, see
`FrontEnd`): how a batch becomes the token embeddings, which positions are
read out, and which outputs a run has. The forward pass returns the logits
at the read-out positions and every intermediate activation under the names
of docs/interfaces.md, and takes an optional clamp tree mirroring those
activations (`icldyn.model.clamp`).

Model details follow the code of Singh et al. 2024 (arXiv 2404.07129), since
phase-change timing depends on them: pre-LayerNorm blocks and a final
LayerNorm; bias on the unembedding; scores scaled by 1/sqrt(d_head); RoPE
(base 10000) on q and k over each head's dimensions; LeCun-normal weights and
zero biases. One known difference (docs/fidelity.md): the q/k/v and output
projections have no bias, as in the reference's 2025 code, while the code
that produced the paper's figures had zero-initialised, trained biases there;
LayerNorm's epsilon is flax's 1e-6 (the reference's equinox: 1e-5).

Unembedding columns are drawn per output from `fold_in(key, output)` (same
distribution as a whole-matrix draw), so that a run with K outputs padded to
a larger capacity in a grid starts from exactly the parameters it has alone;
outputs the run does not have get logits -inf (the front end's
`output_mask`), which makes the padded model behave as a K-output model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from icldyn.model.clamp import apply_clamp

_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


class FrontEnd(Protocol):
  """What a task gives the model core (hashable: it is part of `ModelSpec`).

  Attributes:
    seq_len: T, tokens per sequence.
    num_outputs: L, the output capacity (logits per read-out position).
    output_embedding: (module, parameter) of the embedding whose rows are the
      outputs as inputs (label or token embeddings), for copying scores.

  Methods:
    embed(batch, d_model) -> [B, T, d] token embeddings. Called inside the
      core's Flax scope, so the parameters it makes (`nn.Dense(name=...)`,
      `nn.Embed(...)`) are top-level parameters of the model.
    readout(final) -> [B, R, d]: the positions of the final residual stream
      whose logits the model returns.
    output_mask(num_outputs) -> [L] bool: the outputs a run with per-run
      output count `num_outputs` ([] int array) has; the rest get -inf.
    dummy_batch() -> a batch of one sequence, for initialisation.
  """
  seq_len: int
  num_outputs: int
  output_embedding: tuple[str, str]

  def embed(self, batch: Any, d_model: int) -> jax.Array: ...

  def readout(self, final: jax.Array) -> jax.Array: ...

  def output_mask(self, num_outputs: jax.Array) -> jax.Array: ...

  def dummy_batch(self) -> Any: ...


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Static model shape; hashable so it can key a compilation.

  Attributes:
    num_layers, num_heads, d_model: transformer size.
    front: the task's front end (`FrontEnd`): input embedding, read-out,
      output capacity and sequence length.
    pos_embedding: 'rope' | 'sinusoidal' | 'learned'.
    layer_norm: pre-LN blocks plus a final LN.
    mlp_ratio: None for attention only, else MLP width / d_model.
    rope_base: RoPE base frequency.
  """
  num_layers: int
  num_heads: int
  d_model: int
  front: Any
  pos_embedding: str = "rope"
  layer_norm: bool = True
  mlp_ratio: float | None = None
  rope_base: float = 10000.0

  @property
  def d_head(self) -> int:
    return self.d_model // self.num_heads

  @property
  def seq_len(self) -> int:
    return self.front.seq_len

  @property
  def num_outputs(self) -> int:
    return self.front.num_outputs


def per_output_init(std: float, fan_axis: int, corrected: bool):
  """Truncated-normal init drawn one row at a time along `fan_axis` (an output,
  label or token axis), so a row does not depend on how many rows there are.

  Args:
    std: the scale.
    fan_axis: the output axis of the parameter.
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
SMALL_ATTENTION = 4096


def attention_scores(q: jax.Array, k: jax.Array) -> jax.Array:
  """Unscaled scores [B, H, Tq, Tk] of q, k [B, T, H, dh]."""
  t, dh = q.shape[1], q.shape[-1]
  if t * t * dh > SMALL_ATTENTION:
    return jnp.einsum("bqhe,bkhe->bhqk", q, k)
  qh, kh = jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2)  # [B, H, T, dh]
  return jnp.sum(qh[:, :, :, None, :] * kh[:, :, None, :, :], axis=-1)


def attention_mix(pattern: jax.Array, v: jax.Array) -> jax.Array:
  """Head outputs z [B, T, H, dh] from pattern [B, H, T, T] and v [B, T, H, dh]."""
  t, dh = v.shape[1], v.shape[-1]
  if t * t * dh > SMALL_ATTENTION:
    return jnp.einsum("bhqk,bkhe->bqhe", pattern, v)
  vh = jnp.swapaxes(v, 1, 2)  # [B, H, T, dh]
  z = jnp.sum(pattern[..., None] * vh[:, :, None, :, :], axis=3)  # [B, H, T, dh]
  return jnp.swapaxes(z, 1, 2)


# The exemplar embedding's weight gradient through `contract` (below); False
# gives JAX's own rule (tests compare the two). Only the embedding uses it: its
# [512, 64] weight is most of a run's parameters; on the 64x64 projections the
# change measured no gain.
NATURAL_GRADS = True


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


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None):
  """`nn.Dense`'s dot_general ([..., in] x [in, out]) through `contract`.

  `contract` takes no precision or output type, so none may be asked for
  (rather than dropping them silently).
  """
  if not NATURAL_GRADS:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  if precision is not None or preferred_element_type is not None:
    raise ValueError("contract: precision and preferred_element_type are not supported")
  assert dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())), dimension_numbers
  return contract(lhs, rhs, 1)


# How the gradient of a row lookup (`take_rows`: embeddings, table rows) is
# summed onto repeated rows. JAX's own rule is a scatter-add, which XLA GPU
# runs with atomics: the sum's order, hence its last bits, change from run to
# run. 'auto' keeps the scatter-add on CPU (serial there, so deterministic,
# and bitwise the earlier releases' path) and sums with a one-hot matrix
# product on every other backend; 'onehot' and 'scatter' force one rule
# everywhere (tests compare them). README: Determinism.
ROW_GRADS = "auto"
ROW_GRAD_RULES = ("auto", "onehot", "scatter")


def _onehot_row_sum(num_rows: int, index: jax.Array, g: jax.Array) -> jax.Array:
  """sum_n [index_n == r] g_n as a one-hot product: [num_rows, *g.shape[index.ndim:]].

  HIGHEST precision whatever the training precision: the products are exact
  (by 0 or 1), so the sum is float32's, as the scatter-add's is.
  """
  flat = index.reshape(-1)
  rows = g.reshape((flat.shape[0], -1))
  onehot = (flat[:, None] == jnp.arange(num_rows, dtype=flat.dtype)[None, :]).astype(g.dtype)
  out = jnp.einsum("nr,nf->rf", onehot, rows, precision=jax.lax.Precision.HIGHEST)
  return out.reshape((num_rows,) + g.shape[index.ndim:])


@jax.custom_vjp
def _take_rows_onehot(table: jax.Array, index: jax.Array) -> jax.Array:
  return jnp.take(table, index, axis=0)


def _take_rows_fwd(table, index):
  return _take_rows_onehot(table, index), (table.shape[0], index)


def _take_rows_bwd(res, g):
  num_rows, index = res
  return _onehot_row_sum(num_rows, index, g), None


_take_rows_onehot.defvjp(_take_rows_fwd, _take_rows_bwd)


def take_rows(table: jax.Array, index: jax.Array) -> jax.Array:
  """`table[index]` (rows [N, ...] at int indices [...]) with a deterministic gradient.

  The forward is the gather `jnp.take` does, on every backend; the gradient
  onto the table follows `ROW_GRADS` (per backend with 'auto', through
  `jax.lax.platform_dependent`, resolved when the program is lowered).
  """
  if ROW_GRADS not in ROW_GRAD_RULES:
    raise ValueError(f"ROW_GRADS must be one of {ROW_GRAD_RULES}, got {ROW_GRADS!r}")
  if ROW_GRADS == "scatter":
    return jnp.take(table, index, axis=0)
  if ROW_GRADS == "onehot":
    return _take_rows_onehot(table, index)
  return jax.lax.platform_dependent(table, index, cpu=lambda t, i: jnp.take(t, i, axis=0),
                                    default=_take_rows_onehot)


class Embed(nn.Module):
  """`nn.Embed` (same parameter `embedding` [num_embeddings, features], same
  initialisation) whose lookup is `take_rows`, so its gradient is deterministic
  on every backend."""
  num_embeddings: int
  features: int
  embedding_init: Any

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    """[...] int ids -> [..., features]."""
    table = self.param("embedding", self.embedding_init,
                       (self.num_embeddings, self.features), jnp.float32)
    return take_rows(table, ids)


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
    scores = attention_scores(q, k) / np.sqrt(dh).astype(np.float32)
    if "temperature" in c:
      # Per-head temperature [1, H, 1, 1] (1 unless clamped): a site only when
      # clamped, so the unclamped program is unchanged; x / 1 is exact.
      scores = scores / site("temperature", jnp.ones((1, h, 1, 1), scores.dtype))
    scores = site("scores", jnp.where(causal, scores, -jnp.inf))
    pattern = site("pattern", jax.nn.softmax(scores, axis=-1))
    z = site("z", attention_mix(pattern, v))
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
  """The attention-only transformer core over a task's token embeddings."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, batch: Any, num_outputs: jax.Array,
               clamps: dict | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Runs the model.

    Args:
      batch: a batch of the task's (its front end reads it).
      num_outputs: [] int, the run's output count; the front end's
        `output_mask` of it decides which logits are -inf.
      clamps: optional clamp tree mirroring the activations.

    Returns:
      logits [B, R, L] at the front end's read-out positions, and the
      activation tree.
    """
    s = self.spec
    c = clamps or {}
    tokens = s.front.embed(batch, s.d_model)  # [B, T, d]
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
    logits = nn.Dense(s.num_outputs, name="unembed",
                      kernel_init=per_output_init(1.0 / np.sqrt(s.d_model), 1, corrected=True),
                      bias_init=nn.initializers.zeros)(s.front.readout(final))  # [B, R, L]
    logits = jnp.where(s.front.output_mask(num_outputs), logits, -jnp.inf)
    logits = apply_clamp(logits, c.get("logits"))
    acts["logits"] = logits
    return logits, acts


def init_params(spec: ModelSpec, seed: jax.Array) -> dict:
  """Parameters of one run from its init seed (jit- and vmap-friendly)."""
  return Transformer(spec).init(jax.random.PRNGKey(seed), spec.front.dummy_batch(),
                                spec.num_outputs)["params"]


def apply(spec: ModelSpec, params: dict, batch: Any, num_outputs: jax.Array,
          clamps: dict | None = None) -> tuple[jax.Array, dict]:
  """Pure forward pass: `(logits [B, R, L], acts)` (see `Transformer.__call__`)."""
  return Transformer(spec).apply({"params": params}, batch, num_outputs, clamps)
