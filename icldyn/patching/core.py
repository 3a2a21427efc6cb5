"""Activation patching, path patching, knockouts and circuit scores of one run.

Every function here is pure JAX on one run's parameters and batches (no run
axis), so `jax.vmap` over runs and `jax.lax.map` over checkpoints apply
unchanged (`icldyn.patching.program` does). Every intervention is a clamp
tree (`icldyn.model.Clamp(value, mask)` at activation sites,
docs/interfaces.md): the model applies `where(mask, value, computed)` where
the activation is made and recomputes everything downstream. Sets of
interventions (all heads, all sender-receiver-input triples, all ablated
sets) are one `vmap` over their masks: no Python loop over heads.

Definitions follow Wang et al. 2022, "Interpretability in the Wild: a
Circuit for Indirect Object Identification in GPT-2 small" (arXiv
2211.00593), written for this model (pre-LN, attention only; `x_clean`,
`x_corr` a clean and a corrupted batch, `F(.)` a metric of the read-out):

* Activation patching (their §3, "causal interventions"): the activation
  `a` at one node (one head's slice where the node has heads) of a run on
  the *base* batch is replaced by its value on the *source* batch.
  Denoising: base = x_corr, source = x_clean (does this node restore the
  behaviour?); noising: base = x_clean, source = x_corr (does breaking it
  break the behaviour?). Effect = F(patched) - F(base).

* Path patching (their §3.1 and Appendix B), sender head s -> receiver head
  r through r's input i in {q, k, v}: (1) run x_clean and x_corr; (2) the
  residual stream at r's layer with every head frozen to its clean output
  except s, which takes its corrupted output, is

      resid'_l = resid_pre_l(x_clean) + (z_s(x_corr) - z_s(x_clean)) @ W_O^s;

  r's input i is recomputed from it, i' = LN_l(resid'_l) @ W_i^r (RoPE on q
  and k); (3) x_clean is run again with r's input i clamped to i' at every
  position, everything downstream recomputed. Effect = F(patched) -
  F(x_clean). The direct path s -> logits adds the same difference to the
  final residual stream (before the final LayerNorm) and recomputes the
  final LayerNorm and the unembedding. The patched value is computed as
  `i(x_clean) + (f(resid'_l) - f(resid_l))` with both `f` terms from one
  batched computation, so a sender whose clean and corrupted outputs are
  equal changes nothing, bitwise.

* Knockouts (their §4): a knocked-out head's output `z_h` is replaced by
  its mean over a reference batch, per position (mean ablation), or by 0
  (zero ablation); later layers recompute. `F(X)` below is the metric with
  every head *not* in the set X knocked out.

* Circuit scores (their §4.1-4.3) of a circuit C (a set of heads), M the
  full model:
    faithfulness  F(C) / F(M)  (also (F(C) - F(empty)) / (F(M) - F(empty)),
                  the share of the model's metric above the all-knocked-out
                  baseline, which stays finite while F(M) is near 0);
    completeness  max over subsets K of C of |F(C \\ K) - F(M \\ K)| (the
                  subsets are K = C and random halves of C);
    minimality    per node v in C, max over subsets K of C \\ {v} of
                  |F(C \\ (K + {v})) - F(C \\ K)| / |F(M)| (K = empty and
                  random halves of C \\ {v}).
  The baseline F(empty): with mean ablation, the model whose every head
  writes its reference mean; with zero ablation, the embedding alone
  through the final LayerNorm and unembedding.

Metrics of the read-out (`icldyn.tasks.corrupt.Readout`: target, foil and a
weight per read-out row): `logit_diff`, the mean over weighted rows whose
foil differs from the target of logit(target) - logit(foil) (Wang et al.'s
logit difference of IO and S); `loss`, the weighted mean cross-entropy of
the target; `acc`, the weighted share of rows whose argmax is the target.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from icldyn import model as model_lib
from icldyn.model import Clamp
from icldyn.model import core as model_core
from icldyn.tasks.corrupt import Readout

METRICS = ("logit_diff", "loss", "acc")
INPUTS = ("q", "k", "v")
# Head axis of each per-head activation site (docs/interfaces.md).
HEAD_AXIS = {"attn/q": 2, "attn/k": 2, "attn/v": 2, "attn/z": 2, "attn/scores": 1,
             "attn/pattern": 1}


# --------------------------------------------------------------------------
# Metrics.


def readout_metrics(logits: jax.Array, readout: Readout) -> dict[str, jax.Array]:
  """The patching metrics of one forward pass.

  Args:
    logits: [B, R, L] (outputs a run does not have are -inf).
    readout: target, foil, weight, each [B, R].

  Returns:
    {'logit_diff', 'loss', 'acc'}: [] each (see the module docstring).
  """
  w = readout.weight
  counted = w > 0
  logp = jax.nn.log_softmax(logits, axis=-1)
  take = lambda a, i: jnp.take_along_axis(a, i[..., None], axis=-1)[..., 0]  # noqa: E731
  tl, fl = take(logits, readout.target), take(logits, readout.foil)
  wd = jnp.where(counted & (readout.foil != readout.target), w, 0.0)
  diff = jnp.where(wd > 0, tl - fl, 0.0)
  nll = jnp.where(counted, -take(logp, readout.target), 0.0)
  hit = (jnp.argmax(logits, axis=-1) == readout.target).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1e-30)
  return {"logit_diff": jnp.sum(wd * diff) / jnp.maximum(jnp.sum(wd), 1e-30),
          "loss": jnp.sum(w * nll) / n, "acc": jnp.sum(w * hit) / n}


def _tree(name: str, clamp: Clamp) -> dict:
  """A clamp tree with one leaf at the flat activation name `name`."""
  *path, leaf = name.split("/")
  node: dict = {leaf: clamp}
  for p in reversed(path):
    node = {p: node}
  return node


def _merge(trees: Sequence[dict]) -> dict:
  """Disjoint clamp trees as one (sites must differ)."""
  out: dict = {}
  for t in trees:
    for k, v in t.items():
      out[k] = _merge([out[k], v]) if k in out and isinstance(v, dict) else v
  return out


def head_mask(shape_rank: int, axis: int, num_heads: int, head: jax.Array) -> jax.Array:
  """A bool mask broadcastable to an activation of rank `shape_rank`: True on `head` along `axis`."""
  m = jnp.arange(num_heads) == head
  shape = [1] * shape_rank
  shape[axis] = num_heads
  return m.reshape(shape)


# --------------------------------------------------------------------------
# Activation patching.


def activation_patch(spec: model_lib.ModelSpec, params, base, source, num_outputs: jax.Array,
                     readout: Readout, names: Sequence[str], per_head: bool = True
                     ) -> dict[str, dict[str, jax.Array]]:
  """Effects of putting each node's activation on `source` into the run on `base`.

  Denoising: base = corrupted batch, source = clean batch; noising: the
  other way round (module docstring). The read-out is the clean batch's.

  Args:
    spec: the model.
    params: one run's params.
    base, source: batches of the task, [B, ...] each.
    num_outputs: [] the run's output count.
    readout: the read-out ([B, R] fields).
    names: flat activation names (`layer_1/attn/z`, `layer_0/resid_post`,
      `embed`, ...; `icldyn.model.Cache` names).
    per_head: patch one head at a time where the node has heads.

  Returns:
    {name: {metric: effect}}: effect [H] for a per-head node, else [];
    effect = F(patched) - F(base), F(base) from the same batched program.
  """
  _, src = model_lib.apply(spec, params, source, num_outputs)
  src = model_lib.Cache.from_acts(src)
  out = {}
  for name in names:
    value = src[name]
    site = name.split("/", 1)[1] if name.startswith("layer_") else name
    axis = HEAD_AXIS.get(site) if per_head else None
    if axis is None:
      masks = jnp.asarray([False, True])  # [null, whole node]
      make = lambda m: m  # noqa: E731
    else:
      h = spec.num_heads
      masks = jnp.arange(-1, h)  # -1: null
      make = lambda i: head_mask(value.ndim, axis, h, i)  # noqa: E731

    def one(m):
      logits, _ = model_lib.apply(spec, params, base, num_outputs, _tree(name, Clamp(value, make(m))))
      return readout_metrics(logits, readout)

    res = jax.vmap(one)(masks)
    out[name] = {k: (v[1:] if axis is not None else v[1]) - v[0] for k, v in res.items()}
  return out


# --------------------------------------------------------------------------
# Path patching.


@dataclasses.dataclass(frozen=True)
class Edges:
  """The edges a path-patching program computes (static, hashable).

  Attributes:
    senders: (layer, head) of each sender.
    receivers: (layer, head) of each receiver head (a pair with the sender's
      layer not before the receiver's is NaN).
    inputs: receiver inputs among 'q', 'k', 'v'.
    logits: also every sender's direct path to the logits.
  """
  senders: tuple[tuple[int, int], ...]
  receivers: tuple[tuple[int, int], ...]
  inputs: tuple[str, ...] = INPUTS
  logits: bool = True

  @staticmethod
  def every(spec: model_lib.ModelSpec, inputs: Sequence[str] = INPUTS, logits: bool = True
            ) -> "Edges":
    """Every head to every head of a later layer, and every head to the logits."""
    heads = tuple((l, h) for l in range(spec.num_layers) for h in range(spec.num_heads))
    return Edges(senders=heads, receivers=tuple(x for x in heads if x[0] > 0),
                 inputs=tuple(inputs), logits=logits)

  @property
  def receiver_layers(self) -> tuple[int, ...]:
    return tuple(sorted({l for l, _ in self.receivers}))

  def valid(self) -> np.ndarray:
    """[S, Rc] bool: the sender's layer is before the receiver's."""
    return np.asarray([[s[0] < r[0] for r in self.receivers] for s in self.senders], bool)


def layer_norm(params_ln, x: jax.Array) -> jax.Array:
  """The model's pre-LayerNorm of a layer (flax `nn.LayerNorm`, its parameters) on x [..., d]."""
  return nn.LayerNorm().apply({"params": params_ln}, x)


def sender_deltas(spec: model_lib.ModelSpec, params, base_acts: dict, source_acts: dict,
                  senders: Sequence[tuple[int, int]]) -> jax.Array:
  """Each sender's change of its write to the residual stream, source minus base.

  Args:
    spec: the model.
    params: one run's params.
    base_acts, source_acts: activation trees of the two runs.
    senders: (layer, head) pairs.

  Returns:
    [S, B, T, d]: (z_s(source) - z_s(base)) @ W_O^s.
  """
  out = []
  for l, h in senders:  # static gather of S slices; the products are one einsum
    zb = base_acts[f"layer_{l}"]["attn"]["z"][:, :, h]
    zs = source_acts[f"layer_{l}"]["attn"]["z"][:, :, h]
    out.append((zs - zb, params[f"layer_{l}"]["attn"]["w_o"][h]))
  dz = jnp.stack([d for d, _ in out])  # [S, B, T, dh]
  wo = jnp.stack([w for _, w in out])  # [S, dh, d]
  return jnp.einsum("sbte,sed->sbtd", dz, wo)


def receiver_inputs(spec: model_lib.ModelSpec, params, layer: int, resid: jax.Array
                    ) -> dict[str, jax.Array]:
  """A layer's q, k, v of every head from its residual stream, as the model computes them.

  Args:
    resid: [..., B, T, d] residual streams before the layer.

  Returns:
    {'q', 'k', 'v'}: [..., B, T, H, dh] (q and k after RoPE).
  """
  p = params[f"layer_{layer}"]
  x = layer_norm(p["ln"], resid) if spec.layer_norm else resid
  lead = x.shape[:-2]  # [..., B]
  x = x.reshape((-1,) + x.shape[-2:])  # [N, T, d]
  out = {}
  for name in INPUTS:
    y = jnp.einsum("btd,dhe->bthe", x, p["attn"][f"w_{name}"])
    if name != "v" and spec.pos_embedding == "rope":
      y = model_core.rope(y, spec.rope_base)
    out[name] = y.reshape(lead + y.shape[1:])
  return out


def path_patch(spec: model_lib.ModelSpec, params, base, source, num_outputs: jax.Array,
               readout: Readout, edges: Edges) -> dict[str, dict[str, jax.Array]]:
  """Path-patching effects of every edge (Wang et al. 2022, §3.1; module docstring).

  Noising (Wang et al.'s form): base = clean, source = corrupted; denoising
  swaps them.

  Args:
    spec: the model.
    params: one run's params.
    base, source: batches, [B, ...] each.
    num_outputs: [] the run's output count.
    readout: the clean batch's read-out.
    edges: the edges.

  Returns:
    {'heads': {metric: [S, Rc, I]}, 'logits': {metric: [S]} (if
    edges.logits), 'base': {metric: []}, 'source': {metric: []}}: effects
    F(patched) - F(base) (NaN where the sender is not before the receiver),
    and the metrics of the two unpatched runs.
  """
  logits_b, acts_b = model_lib.apply(spec, params, base, num_outputs)
  logits_s, acts_s = model_lib.apply(spec, params, source, num_outputs)
  out = {"base": readout_metrics(logits_b, readout), "source": readout_metrics(logits_s, readout)}
  senders = tuple(edges.senders)
  deltas = sender_deltas(spec, params, acts_b, acts_s, senders)  # [S, B, T, d]
  zero = jnp.zeros_like(deltas[:1])
  h = spec.num_heads

  if edges.receivers:
    layers = edges.receiver_layers
    values = {}  # (layer, input) -> [S, B, T, H, dh]
    for l in layers:
      resid = acts_b[f"layer_{l}"]["resid_pre"]
      new = receiver_inputs(spec, params, l, resid[None] + jnp.concatenate([zero, deltas]))
      for name in edges.inputs:
        clean = acts_b[f"layer_{l}"]["attn"][name]
        values[(l, name)] = clean[None] + (new[name][1:] - new[name][:1])
    # One row per (receiver, input), plus a null row first.
    rows = [(l, hh, i) for (l, hh) in edges.receivers for i in range(len(edges.inputs))]
    r_layer = jnp.asarray([-1] + [r[0] for r in rows])
    r_head = jnp.asarray([-1] + [r[1] for r in rows])
    r_input = jnp.asarray([-1] + [r[2] for r in rows])

    def per_sender(vals):
      def per_row(rl, rh, ri):
        tree = _merge([_tree(f"layer_{l}/attn/{name}",
                             Clamp(vals[(l, name)], head_mask(4, 2, h, rh) &
                                   (rl == l) & (ri == k)))
                       for l in layers for k, name in enumerate(edges.inputs)])
        logits, _ = model_lib.apply(spec, params, base, num_outputs, tree)
        return readout_metrics(logits, readout)
      return jax.vmap(per_row)(r_layer, r_head, r_input)

    res = jax.vmap(per_sender)(values)  # {metric: [S, 1 + rows]}
    valid = jnp.asarray(edges.valid())  # [S, Rc]
    shape = (len(senders), len(edges.receivers), len(edges.inputs))
    out["heads"] = {k: jnp.where(valid[:, :, None], (v[:, 1:] - v[:, :1]).reshape(shape), jnp.nan)
                    for k, v in res.items()}

  if edges.logits:
    last = f"layer_{spec.num_layers - 1}"
    final = acts_b[last]["resid_post"]

    def direct(delta, on):
      tree = _tree(f"{last}/resid_post", Clamp(final + delta, on))
      logits, _ = model_lib.apply(spec, params, base, num_outputs, tree)
      return readout_metrics(logits, readout)

    res = jax.vmap(direct)(jnp.concatenate([zero, deltas]),
                           jnp.asarray([False] + [True] * len(senders)))
    out["logits"] = {k: v[1:] - v[0] for k, v in res.items()}
  return out


# --------------------------------------------------------------------------
# Knockouts.


def head_means(spec: model_lib.ModelSpec, params, reference, num_outputs: jax.Array) -> jax.Array:
  """Each head's mean output over a reference batch, per position.

  Returns:
    [L, T, H, dh]: the mean of z over the batch's sequences.
  """
  _, acts = model_lib.apply(spec, params, reference, num_outputs)
  return jnp.stack([jnp.mean(acts[f"layer_{l}"]["attn"]["z"], axis=0)
                    for l in range(spec.num_layers)])


def knockout(spec: model_lib.ModelSpec, params, batch, num_outputs: jax.Array, readout: Readout,
             sets: jax.Array, means: jax.Array | None) -> dict[str, jax.Array]:
  """Metrics with each set of heads knocked out.

  Args:
    spec: the model.
    params: one run's params.
    batch: the batch the metrics are read on.
    num_outputs: [] the run's output count.
    readout: its read-out.
    sets: [K, L, H] bool, True = knocked out.
    means: [L, T, H, dh] from `head_means` (mean ablation), or None (zero
      ablation).

  Returns:
    {metric: [K]}.
  """
  nl = spec.num_layers
  fill = jnp.zeros((nl,) + (spec.seq_len, spec.num_heads, spec.d_head)) if means is None else means

  def one(ko):
    tree = {f"layer_{l}": {"attn": {"z": Clamp(fill[l][None], ko[l][None, None, :, None])}}
            for l in range(nl)}
    logits, _ = model_lib.apply(spec, params, batch, num_outputs, tree)
    return readout_metrics(logits, readout)

  return jax.vmap(one)(sets)


def circuit_sets(circuit: jax.Array, key: jax.Array, num_samples: int) -> dict[str, jax.Array]:
  """The knocked-out sets the circuit scores need (`knockout`'s `sets`).

  Args:
    circuit: [L, H] bool, the circuit's heads.
    key: PRNG key of the random subsets.
    num_samples: subsets per score (the first is K = C for completeness and
      K = empty for minimality, the rest random halves).

  Returns:
    {'fixed': [3, L, H] (M, C, empty: the sets knocked out are none, not C,
    all), 'complete': [2, n, L, H] (C \\ K, M \\ K), 'minimal':
    [2, L*H, n, L, H] (C \\ (K + v), C \\ K, per node v)}.
  """
  c = circuit.astype(bool)
  nl, h = c.shape
  n = num_samples
  k1, k2 = jax.random.split(key)
  half = jax.random.bernoulli(k1, 0.5, (n, nl, h)) & c
  ks = half.at[0].set(c)  # K = C first
  complete = jnp.stack([~c[None] | ks, ks])  # knocked out: not in C\K ; in K
  v = jnp.eye(nl * h, dtype=bool).reshape(nl * h, nl, h)  # [V, L, H]
  kv = jax.random.bernoulli(k2, 0.5, (nl * h, n, nl, h)) & c[None, None] & ~v[:, None]
  kv = kv.at[:, 0].set(False)  # K = empty first
  base = ~c[None, None] | kv
  minimal = jnp.stack([base | v[:, None], base])
  fixed = jnp.stack([jnp.zeros_like(c), ~c, jnp.ones_like(c)])
  return {"fixed": fixed, "complete": complete, "minimal": minimal}


def circuit_scores(spec: model_lib.ModelSpec, params, batch, num_outputs: jax.Array,
                   readout: Readout, circuit: jax.Array, means: jax.Array | None,
                   key: jax.Array, num_samples: int = 8, metric: str = "logit_diff"
                   ) -> dict[str, jax.Array]:
  """Faithfulness, completeness and minimality of a circuit (Wang et al. 2022, §4).

  Args:
    spec, params, batch, num_outputs, readout: as `knockout`.
    circuit: [L, H] bool, the circuit's heads.
    means: as `knockout` (None: zero ablation).
    key: PRNG key of the sampled subsets.
    num_samples: subsets per score.
    metric: the metric F.

  Returns:
    {'F_model', 'F_circuit', 'F_empty', 'faithfulness',
    'faithfulness_recovered', 'completeness': [], 'minimality': [L, H]
    (NaN for heads outside the circuit)}; formulas in the module docstring.
  """
  sets = circuit_sets(circuit, key, num_samples)
  nl, h = circuit.shape
  flat = jnp.concatenate([sets["fixed"], sets["complete"].reshape(-1, nl, h),
                          sets["minimal"].reshape(-1, nl, h)])
  f = knockout(spec, params, batch, num_outputs, readout, flat, means)[metric]
  f_m, f_c, f_e = f[0], f[1], f[2]
  n = num_samples
  comp = f[3:3 + 2 * n].reshape(2, n)
  mini = f[3 + 2 * n:].reshape(2, nl * h, n)
  gap = jnp.max(jnp.abs(comp[0] - comp[1]))
  per_node = jnp.max(jnp.abs(mini[0] - mini[1]), axis=1) / jnp.abs(f_m)
  return {"F_model": f_m, "F_circuit": f_c, "F_empty": f_e,
          "faithfulness": f_c / f_m, "faithfulness_recovered": (f_c - f_e) / (f_m - f_e),
          "completeness": gap,
          "minimality": jnp.where(circuit.reshape(-1), per_node, jnp.nan).reshape(nl, h)}
