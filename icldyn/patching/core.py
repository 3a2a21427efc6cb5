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

* Circuits of edges (`edge_scores`, what `icldyn patch` scores): C is a
  set of edges s -> r.i and s -> logits; F(X) is the metric with every edge
  not in X mean-ablated path by path (`edge_ablate`: along an ablated edge
  the receiver reads the sender's mean output), and the scores below are
  taken over subsets of edges; formulas in `edge_scores`.

* Circuit scores (their §4.1-4.3) of a circuit C of heads (`circuit_scores`),
  M the full model:
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
from typing import NamedTuple, Sequence

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


def forward(spec: model_lib.ModelSpec, params, batch, num_outputs: jax.Array,
            tree: dict | None = None, plan=None, clamp_params=None) -> tuple[jax.Array, dict]:
  """One run's forward pass with the interventions `tree`, under its training clamps.

  Args:
    spec, params, batch, num_outputs: as `icldyn.model.apply`.
    tree: the interventions (a clamp tree), or None.
    plan: the run's training clamp plan (`icldyn.clamps.Plan`, `Static.plan`),
      or None for the unclamped model. Its clamps are computed on `batch` and
      win where they and `tree` set the same entry (`Plan.forward`'s `extra`).
    clamp_params: the run's per-run clamp arrays (`Props.clamp`).

  Returns:
    (logits [B, R, L], acts).
  """
  if plan is None:
    return model_lib.apply(spec, params, batch, num_outputs, tree)
  return plan.forward(spec, params, batch, num_outputs, clamp_params, extra=tree)


def map_batched(fn, xs, batch_size: int | None):
  """`vmap(fn)(xs)`, or `lax.map` in groups of `batch_size` (bounds the memory of
  interventions computed side by side; None or 0: all at once)."""
  n = jax.tree.leaves(xs)[0].shape[0]
  if not batch_size or batch_size >= n:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=batch_size)


# --------------------------------------------------------------------------
# Activation patching.


def activation_patch(spec: model_lib.ModelSpec, params, base, source, num_outputs: jax.Array,
                     readout: Readout, names: Sequence[str], per_head: bool = True, *,
                     plan=None, clamp_params=None) -> dict[str, dict[str, jax.Array]]:
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
    plan, clamp_params: the run's training clamps (`forward`; None: unclamped).

  Returns:
    {name: {metric: effect}}: effect [H] for a per-head node, else [];
    effect = F(patched) - F(base), F(base) from the same batched program.
  """
  _, src = forward(spec, params, source, num_outputs, None, plan, clamp_params)
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
      logits, _ = forward(spec, params, base, num_outputs, _tree(name, Clamp(value, make(m))),
                          plan, clamp_params)
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
               readout: Readout, edges: Edges, *, plan=None, clamp_params=None,
               batch_size: int | None = None) -> dict[str, dict[str, jax.Array]]:
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
    plan, clamp_params: the run's training clamps (`forward`; None: unclamped).
      Every pass, the unpatched ones included, runs under them.
    batch_size: senders whose patched passes run side by side (`map_batched`;
      None: all). Each sender has 1 + |receivers| x |inputs| passes; fewer
      side by side bound the memory of long sequences.

  Returns:
    {'heads': {metric: [S, Rc, I]}, 'logits': {metric: [S]} (if
    edges.logits), 'base': {metric: []}, 'source': {metric: []}}: effects
    F(patched) - F(base) (NaN where the sender is not before the receiver),
    and the metrics of the two unpatched runs.
  """
  logits_b, acts_b = forward(spec, params, base, num_outputs, None, plan, clamp_params)
  logits_s, acts_s = forward(spec, params, source, num_outputs, None, plan, clamp_params)
  out = {"base": readout_metrics(logits_b, readout), "source": readout_metrics(logits_s, readout)}
  senders = tuple(edges.senders)
  deltas = sender_deltas(spec, params, acts_b, acts_s, senders)  # [S, B, T, d]
  zero = jnp.zeros_like(deltas[:1])
  h = spec.num_heads

  # Senders with a receiver in a later layer (in a 2-layer model, the layer-0
  # heads): the others' patched passes would all be NaN, so none is run.
  active = [i for i, s in enumerate(senders) if any(s[0] < r[0] for r in edges.receivers)]
  # Receivers all in the last layer of an attention-only model (every
  # receiver of a 2-layer model): two stages instead of one pass per
  # (receiver, input) (`_last_layer_rows`).
  last_layer_only = (not spec.mlp_ratio and
                     all(r[0] == spec.num_layers - 1 for r in edges.receivers))
  if active:
    layers = edges.receiver_layers
    values = {}  # (layer, input) -> [S', B, T, H, dh], S' active senders
    for l in layers:
      resid = acts_b[f"layer_{l}"]["resid_pre"]
      new = receiver_inputs(spec, params, l,
                            resid[None] + jnp.concatenate([zero, deltas[np.asarray(active)]]))
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
        logits, _ = forward(spec, params, base, num_outputs, tree, plan, clamp_params)
        return readout_metrics(logits, readout)
      return jax.vmap(per_row)(r_layer, r_head, r_input)

    if last_layer_only:
      res = map_batched(lambda v: _last_layer_rows(spec, params, base, num_outputs, readout, edges,
                                                   v, acts_b, plan, clamp_params),
                        values, batch_size)
    else:
      res = map_batched(per_sender, values, batch_size)  # {metric: [S', 1 + rows]}
    valid = jnp.asarray(edges.valid())  # [S, Rc]
    shape = (len(senders), len(edges.receivers), len(edges.inputs))
    out["heads"] = {
        k: jnp.where(valid[:, :, None], jnp.full(shape, jnp.nan, v.dtype).at[np.asarray(active)].set(
            (v[:, 1:] - v[:, :1]).reshape((len(active),) + shape[1:])), jnp.nan)
        for k, v in res.items()}
  elif edges.receivers:
    out["heads"] = {k: jnp.full((len(senders), len(edges.receivers), len(edges.inputs)), jnp.nan)
                    for k in METRICS}

  if edges.logits:
    last = f"layer_{spec.num_layers - 1}"
    final = acts_b[last]["resid_post"]

    def direct(delta, on):
      tree = _tree(f"{last}/resid_post", Clamp(final + delta, on))
      logits, _ = forward(spec, params, base, num_outputs, tree, plan, clamp_params)
      return readout_metrics(logits, readout)

    res = map_batched(lambda a: direct(*a), (jnp.concatenate([zero, deltas]),
                                             jnp.asarray([False] + [True] * len(senders))),
                      batch_size)
    out["logits"] = {k: v[1:] - v[0] for k, v in res.items()}
  return out


def _last_layer_rows(spec: model_lib.ModelSpec, params, base, num_outputs, readout: Readout,
                     edges: Edges, vals: dict, acts_b: dict, plan, clamp_params
                     ) -> dict[str, jax.Array]:
  """One sender's path-patching metrics into receivers of the last layer, in two stages.

  A receiver's patched input changes only its own output z_r (heads do not
  mix inside a layer), and in the last layer of an attention-only model
  that output reaches the logits only as (z_r' - z_r) @ W_O^r added to the
  final residual stream. So: (1) one pass per input i with that input of
  *every* head of the layer patched at once gives every receiver's z_r'
  (|inputs| passes, not |receivers| x |inputs| through the whole layer);
  (2) one pass per (receiver, input) from the final residual stream plus
  that receiver's change, the model's own final LayerNorm, read-out and
  unembedding (and training clamps). A null row in each stage (nothing
  patched), from the same batched computation, is what the effects are
  measured against, so a sender that changes nothing has effect 0, bitwise.
  Equal to the one-pass definition up to float rounding (the tests compare
  both with plain forward passes).

  Args:
    vals: {(layer, input): [B, T, H, dh]} this sender's patched inputs.
    acts_b: the base run's activations.

  Returns:
    {metric: [1 + Rc * I]}: the null row, then (receiver, input) rows in
    `path_patch`'s order.
  """
  l = spec.num_layers - 1
  name_l = f"layer_{l}"
  n_in = len(edges.inputs)

  def stage1(k):  # k = -1: nothing patched
    tree = _merge([_tree(f"{name_l}/attn/{name}", Clamp(vals[(l, name)], k == i))
                   for i, name in enumerate(edges.inputs)])
    _, acts = forward(spec, params, base, num_outputs, tree, plan, clamp_params)
    return acts[name_l]["attn"]["z"]

  z = jax.vmap(stage1)(jnp.arange(-1, n_in))  # [1 + I, B, T, H, dh]
  heads = np.asarray([r[1] for r in edges.receivers])
  w_o = params[name_l]["attn"]["w_o"][heads]  # [Rc, dh, d]
  dz = z[1:, :, :, heads] - z[:1, :, :, heads]  # [I, B, T, Rc, dh]
  delta = jnp.einsum("ibtre,red->ribtd", dz, w_o).reshape((-1,) + dz.shape[1:3] + w_o.shape[-1:])
  final = acts_b[name_l]["resid_post"]

  def stage2(d):
    tree = _tree(f"{name_l}/resid_post", Clamp(final + d, jnp.asarray(True)))
    logits, _ = forward(spec, params, base, num_outputs, tree, plan, clamp_params)
    return readout_metrics(logits, readout)

  return jax.vmap(stage2)(jnp.concatenate([jnp.zeros_like(delta[:1]), delta]))


# --------------------------------------------------------------------------
# Knockouts.


def head_means(spec: model_lib.ModelSpec, params, reference, num_outputs: jax.Array, *,
               plan=None, clamp_params=None) -> jax.Array:
  """Each head's mean output over a reference batch, per position (under the training clamps).

  Returns:
    [L, T, H, dh]: the mean of z over the batch's sequences.
  """
  _, acts = forward(spec, params, reference, num_outputs, None, plan, clamp_params)
  return jnp.stack([jnp.mean(acts[f"layer_{l}"]["attn"]["z"], axis=0)
                    for l in range(spec.num_layers)])


def knockout(spec: model_lib.ModelSpec, params, batch, num_outputs: jax.Array, readout: Readout,
             sets: jax.Array, means: jax.Array | None, *, plan=None, clamp_params=None,
             batch_size: int | None = None) -> dict[str, jax.Array]:
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
    plan, clamp_params: the run's training clamps (`forward`).
    batch_size: sets whose passes run side by side (`map_batched`).

  Returns:
    {metric: [K]}.
  """
  nl = spec.num_layers
  fill = jnp.zeros((nl,) + (spec.seq_len, spec.num_heads, spec.d_head)) if means is None else means

  def one(ko):
    tree = {f"layer_{l}": {"attn": {"z": Clamp(fill[l][None], ko[l][None, None, :, None])}}
            for l in range(nl)}
    logits, _ = forward(spec, params, batch, num_outputs, tree, plan, clamp_params)
    return readout_metrics(logits, readout)

  return map_batched(one, sets, batch_size)


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
                   key: jax.Array, num_samples: int = 8, metric: str = "logit_diff", *,
                   plan=None, clamp_params=None, batch_size: int | None = None
                   ) -> dict[str, jax.Array]:
  """Faithfulness, completeness and minimality of a circuit of heads (Wang et al. 2022, §4).

  Head-level: a node outside the set is knocked out everywhere (all of its
  outgoing paths). `edge_scores` scores a circuit of edges.

  Args:
    spec, params, batch, num_outputs, readout: as `knockout`.
    circuit: [L, H] bool, the circuit's heads.
    means: as `knockout` (None: zero ablation).
    key: PRNG key of the sampled subsets.
    num_samples: subsets per score.
    metric: the metric F.
    plan, clamp_params, batch_size: as `knockout`.

  Returns:
    {'F_model', 'F_circuit', 'F_empty', 'faithfulness',
    'faithfulness_recovered', 'completeness': [], 'minimality': [L, H]
    (NaN for heads outside the circuit)}; formulas in the module docstring.
  """
  sets = circuit_sets(circuit, key, num_samples)
  nl, h = circuit.shape
  flat = jnp.concatenate([sets["fixed"], sets["complete"].reshape(-1, nl, h),
                          sets["minimal"].reshape(-1, nl, h)])
  f = knockout(spec, params, batch, num_outputs, readout, flat, means, plan=plan,
               clamp_params=clamp_params, batch_size=batch_size)[metric]
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


# --------------------------------------------------------------------------
# Circuits of edges: path-level ablation.


class EdgeSet(NamedTuple):
  """A set of edges of the model's graph, as masks over every possible edge.

  Heads are numbered flat, `n = layer * H + head` (N = L * H). Entries whose
  sender is not in a layer before the receiver's are not edges and are
  ignored. The embedding's edges (into every head's inputs and the logits)
  are not in the set: they are always kept (Wang et al. 2022 keep the input
  too).

  Attributes:
    heads: [N, N, 3] bool: sender n -> receiver m through input i (q, k, v).
    logits: [N] bool: sender n -> the logits (the direct path).
  """
  heads: jax.Array
  logits: jax.Array


def every_edge(spec: model_lib.ModelSpec) -> EdgeSet:
  """The full model's edge set M (numpy): every head into every later head's q, k, v and the logits."""
  n = spec.num_layers * spec.num_heads
  layer = np.arange(n) // spec.num_heads
  heads = np.broadcast_to((layer[:, None] < layer[None, :])[:, :, None], (n, n, 3)).copy()
  return EdgeSet(heads=heads, logits=np.ones((n,), bool))


def flat_edges(edges: EdgeSet) -> jax.Array:
  """[N * N * 3 + N]: an edge set as one flat mask (heads first, then logits)."""
  return jnp.concatenate([jnp.reshape(edges.heads, (-1,)), jnp.reshape(edges.logits, (-1,))])


def unflat_edges(flat: jax.Array, num_heads_total: int) -> EdgeSet:
  """The inverse of `flat_edges` for N = `num_heads_total`."""
  n = num_heads_total
  return EdgeSet(heads=jnp.reshape(flat[:n * n * 3], (n, n, 3)), logits=flat[n * n * 3:])


def head_inputs(spec: model_lib.ModelSpec, params, layer: int, resid: jax.Array) -> jax.Array:
  """Each head's q, k, v of `layer`, each from a residual stream of its own.

  Args:
    resid: [..., 3, H, B, T, d]: the stream that head h's input i (q, k, v) reads.

  Returns:
    [..., 3, B, T, H, dh] (q and k after RoPE), laid out as the model's q, k, v.
  """
  p = params[f"layer_{layer}"]
  x = layer_norm(p["ln"], resid) if spec.layer_norm else resid
  lead = x.shape[:-5]
  out = []
  for i, name in enumerate(INPUTS):
    y = jnp.einsum("...hbtd,dhe->...bthe", x[..., i, :, :, :, :], p["attn"][f"w_{name}"])
    if name != "v" and spec.pos_embedding == "rope":
      y = model_core.rope(y.reshape((-1,) + y.shape[-3:]), spec.rope_base).reshape(y.shape)
    out.append(y)
  return jnp.stack(out, axis=len(lead))


def edge_ablate(spec: model_lib.ModelSpec, params, batch, num_outputs: jax.Array,
                keep: EdgeSet, means: jax.Array | None, *, plan=None, clamp_params=None,
                first: tuple[jax.Array, dict] | None = None) -> jax.Array:
  """Logits of the model with every edge not in `keep` mean-ablated (path-level ablation).

  Along an ablated edge s -> r.i the receiver's input i reads the sender's
  mean output instead of its output; along a kept edge, its output in this
  same ablated model (so a head whose inputs are ablated passes on what it
  then computes). Layer by layer, for the receivers of layer l:

      resid_{r,i} = resid_pre_l + sum_{s in layers < l, (s->r.i) not in keep}
                    (zbar_s - z_s) @ W_O^s
      i_r         = i_r(model) + (f_i^r(resid_{r,i}) - f_i^r(resid_pre_l))

  with z_s, resid_pre_l and i_r(model) from the pass with layers < l already
  ablated, f_i^r the receiver's LayerNorm, projection and RoPE, both f terms
  from one batched computation (a kept edge changes nothing, bitwise); then
  the logits read resid_post_{L-1} + sum_{(s->logits) not in keep}
  (zbar_s - z_s) @ W_O^s. L + 1 forward passes (the first one needs no
  `keep`; pass it as `first` to share it between edge sets). With every edge
  kept this is the model itself, bitwise; with none kept, the logits read the
  embedding plus every head's mean output: the all-knocked-out baseline of
  `knockout`.

  Args:
    spec, params, batch, num_outputs: as `icldyn.model.apply`.
    keep: the edges kept (`EdgeSet`, N = L * H).
    means: [L, T, H, dh] each head's mean output (`head_means`), or None for
      zero ablation.
    plan, clamp_params: the run's training clamps (`forward`).
    first: `forward(spec, params, batch, num_outputs, None, plan, clamp_params)`,
      if already computed.

  Returns:
    logits [B, R, L].

  Raises:
    ValueError: the model has MLPs (their paths are not edges of this graph).
  """
  if spec.mlp_ratio:
    raise ValueError("edge circuits are defined for attention-only models (model.mlp_ratio=None)")
  nl, h = spec.num_layers, spec.num_heads
  fill = jnp.zeros((nl, spec.seq_len, h, spec.d_head)) if means is None else means
  _, acts = first if first is not None else forward(spec, params, batch, num_outputs, None, plan,
                                                    clamp_params)

  def dz(acts, layers):
    """[S, B, T, d]: (zbar_s - z_s) @ W_O^s of every head s of `layers`."""
    out = [jnp.einsum("bthe,hed->hbtd", fill[l][None] - acts[f"layer_{l}"]["attn"]["z"],
                      params[f"layer_{l}"]["attn"]["w_o"]) for l in layers]
    return jnp.concatenate(out)

  tree: dict = {}
  for l in range(1, nl):
    d = dz(acts, range(l))  # [S, B, T, d], S = l * H senders
    drop = ~keep.heads[:l * h, l * h:(l + 1) * h]  # [S, H, 3]
    delta = jnp.einsum("shi,sbtd->ihbtd", drop.astype(d.dtype), d)  # [3, H, B, T, d]
    resid = acts[f"layer_{l}"]["resid_pre"]
    # [2, 3, B, T, H, dh]: the ablated streams and the unablated one, in one computation.
    new = head_inputs(spec, params, l, resid + jnp.stack([delta, jnp.zeros_like(delta)]))
    attn = acts[f"layer_{l}"]["attn"]
    tree = _merge([tree] + [_tree(f"layer_{l}/attn/{name}",
                                  Clamp(attn[name] + (new[0, i] - new[1, i]), jnp.asarray(True)))
                            for i, name in enumerate(INPUTS)])
    _, acts = forward(spec, params, batch, num_outputs, tree, plan, clamp_params)
  last = f"layer_{nl - 1}"
  d = dz(acts, range(nl))  # [N, B, T, d]
  delta = jnp.einsum("s,sbtd->btd", (~keep.logits).astype(d.dtype), d)
  final = _tree(f"{last}/resid_post", Clamp(acts[last]["resid_post"] + delta, jnp.asarray(True)))
  # Without training clamps the logits depend on the last residual stream
  # alone, so the last pass leaves the earlier layers unclamped: computed
  # once for every edge set, not once per set. A plan's clamps may read the
  # pass's activations (`copy` reads a head's scores), so they keep them.
  tree = final if plan is None else _merge([tree, final])
  logits, _ = forward(spec, params, batch, num_outputs, tree, plan, clamp_params)
  return logits


def edge_circuit_sets(circuit: jax.Array, valid: jax.Array, index: jax.Array, key: jax.Array,
                      num_samples: int) -> dict[str, jax.Array]:
  """The kept edge sets the edge-level scores need (flat masks, `flat_edges`).

  Args:
    circuit: [E] bool, the circuit C (flat).
    valid: [E] bool, the full model's edges M (`flat_edges(every_edge(spec))`).
    index: [P] int, the flat index of each circuit edge scored for
      minimality (-1: padding).
    key: PRNG key of the random subsets.
    num_samples: subsets per score (the first is K = C for completeness and
      K = empty for minimality, the rest random halves).

  Returns:
    {'fixed': [3, E] (kept: M, C, none), 'complete': [2, n, E] (kept:
    C \\ K, M \\ K), 'minimal': [2, P, n, E] (kept: C \\ (K + {e}),
    C \\ K, per scored edge e)}.
  """
  c = circuit.astype(bool) & valid
  e_all = c.shape[0]
  n = num_samples
  k1, k2 = jax.random.split(key)
  ks = (jax.random.bernoulli(k1, 0.5, (n, e_all)) & c).at[0].set(c)  # K = C first
  complete = jnp.stack([c[None] & ~ks, valid[None] & ~ks])
  onehot = (jnp.arange(e_all)[None, :] == index[:, None]) & (index[:, None] >= 0)  # [P, E]
  kv = jax.random.bernoulli(k2, 0.5, (index.shape[0], n, e_all)) & c & ~onehot[:, None]
  kv = kv.at[:, 0].set(False)  # K = empty first
  without_k = c[None, None] & ~kv
  minimal = jnp.stack([without_k & ~onehot[:, None], without_k])
  fixed = jnp.stack([valid, c, jnp.zeros_like(c)])
  return {"fixed": fixed, "complete": complete, "minimal": minimal}


def edge_scores(spec: model_lib.ModelSpec, params, batch, num_outputs: jax.Array,
                readout: Readout, circuit: jax.Array, index: jax.Array, means: jax.Array | None,
                key: jax.Array, num_samples: int = 8, metric: str = "logit_diff", *,
                plan=None, clamp_params=None, batch_size: int | None = None
                ) -> dict[str, jax.Array]:
  """Faithfulness, completeness and minimality of a circuit of edges (Wang et al. 2022, §4).

  Wang et al. 2022 ("Interpretability in the Wild", arXiv 2211.00593, §4)
  judge a circuit C, a subgraph of the model M, by the metric F of the
  model with everything outside C knocked out by mean ablation over a
  reference distribution. Here C is a set of edges s -> r.i (a head's output
  into a later head's input i in {q, k, v}) and s -> logits, and "outside C"
  is ablated per edge (`edge_ablate`: path-level ablation; a head in C still
  reads only the means of senders whose edges into it are not in C). With
  F(X) the metric when only the edges X are kept:

    faithfulness            F(C) / F(M)
    faithfulness_recovered  (F(C) - F(empty)) / (F(M) - F(empty)), the share
                            of the model's metric above the all-ablated
                            baseline (finite while F(M) is near 0)
    completeness            max over K subset of C of |F(C \\ K) - F(M \\ K)|
                            (K = C and num_samples - 1 random halves of C)
    minimality(e), e in C   max over K subset of C \\ {e} of
                            |F(C \\ (K + {e})) - F(C \\ K)| / |F(M)|
                            (K = empty and random halves of C \\ {e})

  F(M) is the unablated model (bitwise: every edge kept reproduces it);
  F(empty), every edge ablated, is the embedding plus every head's mean
  output read by the unembedding (zero ablation: the embedding alone), the
  same baseline as `circuit_scores`' all-knocked-out set. The subsets are
  drawn from `key`, so they are the same at every checkpoint.

  Args:
    spec, params, batch, num_outputs, readout: as `knockout`.
    circuit: [E] bool, the circuit's edges (`flat_edges` of an `EdgeSet`).
    index: [P] int, the flat indices of the circuit's edges to score for
      minimality (-1: padding, scored NaN); P is static.
    means: [L, T, H, dh] (`head_means`), or None (zero ablation).
    key: PRNG key of the sampled subsets.
    num_samples: subsets per score.
    metric: the metric F.
    plan, clamp_params: the run's training clamps (`forward`).
    batch_size: edge sets whose passes run side by side (`map_batched`).

  Returns:
    {'F_model', 'F_circuit', 'F_empty', 'faithfulness',
    'faithfulness_recovered', 'completeness': [], 'minimality': [P]}.
  """
  n_heads = spec.num_layers * spec.num_heads
  valid = flat_edges(every_edge(spec))
  sets = edge_circuit_sets(circuit, valid, index, key, num_samples)
  e_all = valid.shape[0]
  p = index.shape[0]
  flat = jnp.concatenate([sets["fixed"], sets["complete"].reshape(-1, e_all),
                          sets["minimal"].reshape(-1, e_all)])
  first = forward(spec, params, batch, num_outputs, None, plan, clamp_params)

  def one(keep):
    logits = edge_ablate(spec, params, batch, num_outputs, unflat_edges(keep, n_heads), means,
                         plan=plan, clamp_params=clamp_params, first=first)
    return readout_metrics(logits, readout)[metric]

  f = map_batched(one, flat, batch_size)
  f_m, f_c, f_e = f[0], f[1], f[2]
  n = num_samples
  comp = f[3:3 + 2 * n].reshape(2, n)
  mini = f[3 + 2 * n:].reshape(2, p, n)
  per_edge = jnp.max(jnp.abs(mini[0] - mini[1]), axis=1) / jnp.abs(f_m)
  return {"F_model": f_m, "F_circuit": f_c, "F_empty": f_e,
          "faithfulness": f_c / f_m, "faithfulness_recovered": (f_c - f_e) / (f_m - f_e),
          "completeness": jnp.max(jnp.abs(comp[0] - comp[1])),
          "minimality": jnp.where(index >= 0, per_edge, jnp.nan)}
