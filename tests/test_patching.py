"""icldyn.patching: path patching on a hand-built induction circuit, against plain
two-pass references, knockout baselines, whole-group programs, the tasks'
corruptions and `icldyn patch`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from conftest import run_python, tiny_config
from icldyn import build, cli
from icldyn import model as model_lib
from icldyn import runner
from icldyn.analysis import measures
from icldyn.errors import ConfigError
from icldyn.model import Clamp
from icldyn.patching import command, core
from icldyn.patching import program as program_lib
from icldyn.store import files as wd_lib
from icldyn.tasks import corrupt

# --------------------------------------------------------------------------
# A hand-built induction circuit (token task, no LayerNorm, learned positions).

V, T, D, H = 20, 12, 80, 2
TOK, POS, PREV, OUT = 0, V + 1, V + 1 + T, 2 * (V + 1) + T  # residual-stream blocks
BETA = 100.0  # attention sharpness: softmax weight off the target ~ T e^(-BETA/sqrt(dh))


def token_group(**over):
  values = {"task.name": "repeat_tokens", "tokens.seq_len": T, "tokens.vocab_size": V,
            "tokens.segment_len": 3, "tokens.num_repeats": 1, "tokens.repeat_prob": 1.0,
            "model.d_model": D, "model.num_heads": H, "model.layer_norm": False,
            "model.pos_embedding": "learned"}
  values.update(over)
  return build.prepare(tiny_config(**values)).groups[0]


def induction_params(spec):
  """Layer 0 head 0: previous-token head writing the previous token into PREV;
  layer 1 head 0: induction head (query: own token, key: PREV) copying the
  attended token into OUT, which the unembedding reads. Heads 1: zero."""
  n = V + 1
  dh = spec.d_head
  p = jax.tree.map(np.zeros_like, jax.device_get(model_lib.init_params(spec, 0)))
  p["embed_tokens"]["embedding"][np.arange(n), TOK + np.arange(n)] = 1.0
  p["pos"][np.arange(T), POS + np.arange(T)] = 1.0
  a0, a1 = p["layer_0"]["attn"], p["layer_1"]["attn"]
  a0["w_q"][POS + np.arange(T), 0, np.arange(T)] = BETA  # q(p) = BETA e_p
  a0["w_k"][POS + np.arange(T - 1), 0, np.arange(1, T)] = 1.0  # k(j) = e_(j+1)
  a0["w_v"][TOK + np.arange(n), 0, np.arange(n)] = 1.0
  a0["w_o"][0, np.arange(n), PREV + np.arange(n)] = 1.0
  a1["w_q"][TOK + np.arange(n), 0, np.arange(n)] = BETA
  a1["w_k"][PREV + np.arange(n), 0, np.arange(n)] = 1.0
  a1["w_v"][TOK + np.arange(n), 0, np.arange(n)] = 1.0
  a1["w_o"][0, np.arange(n), OUT + np.arange(n)] = 1.0
  p["unembed"]["kernel"][OUT + np.arange(n), np.arange(n)] = 10.0
  assert dh >= max(T, n)
  return p


@pytest.fixture(scope="module")
def induction():
  pg = token_group()
  spec = pg.static.model
  params = induction_params(spec)
  batch = jax.tree.map(lambda x: x[0], measures.eval_batch(pg.static, pg.table, pg.props, 64))
  num = pg.props.data.num_outputs[0]
  return spec, params, batch, num


def test_the_hand_built_model_is_an_induction_circuit(induction):
  spec, params, batch, num = induction
  logits, acts = model_lib.apply(spec, params, batch, num)
  pat0 = np.asarray(acts["layer_0"]["attn"]["pattern"][:, 0])
  # Off-target weight: (T - 1) e^(-BETA / sqrt(dh)) ~ 1.5e-6.
  np.testing.assert_allclose(pat0[:, np.arange(1, T), np.arange(T - 1)], 1.0, atol=1e-5)
  rep = np.asarray(batch.repeated)
  pred = np.asarray(jnp.argmax(logits, -1))
  target = np.asarray(batch.tokens)[:, 1:]
  # Accidental earlier matches of i.i.d. tokens split the head's attention
  # sometimes, so most (not all) repeated tokens are predicted.
  assert np.mean(pred[:, :-1][rep[:, :-1]] == target[rep[:, :-1]]) > 0.8


def test_path_patching_finds_the_k_composition_edge(induction):
  spec, params, batch, num = induction
  corrupted, readout = corrupt.resample(batch)
  edges = core.Edges.every(spec)
  out = jax.jit(lambda p: core.path_patch(spec, p, batch, corrupted, num, readout, edges))(params)
  heads = np.asarray(out["heads"]["logit_diff"])  # [S=4, Rc=2, I=3]
  k = edges.inputs.index("k")
  assert out["base"]["logit_diff"] > 5  # the circuit works on the clean batch
  assert heads[0, 0, k] < -0.5 * float(out["base"]["logit_diff"])  # L0H0 -> L1H0 (k)
  others = np.ones(heads.shape, bool)
  others[0, 0, k] = False
  others[2:] = False  # layer-1 senders have no later receiver (NaN)
  assert np.all(np.isnan(heads[2:]))
  # Every other path is exactly zero here: its weights read or write only
  # blocks the perturbation does not touch; near-zero would need a tolerance.
  np.testing.assert_array_equal(heads[others], 0.0)
  direct = np.asarray(out["logits"]["logit_diff"])  # senders L0H0, L0H1, L1H0, L1H1
  np.testing.assert_array_equal(direct[[0, 1, 3]], 0.0)
  assert direct[2] < -0.5 * float(out["base"]["logit_diff"])


def test_patching_the_clean_run_into_itself_changes_nothing_bitwise(induction):
  spec, params, batch, num = induction
  readout = corrupt.break_copies(batch)[1]
  edges = core.Edges.every(spec)
  same = jax.jit(lambda p: core.path_patch(spec, p, batch, batch, num, readout, edges))(params)
  for part in ("heads", "logits"):
    for v in same[part].values():
      v = np.asarray(v)
      assert np.all((v == 0) | np.isnan(v)), part
  names = ["embed", "layer_0/attn/z", "layer_1/attn/pattern", "layer_1/attn/k",
           "layer_0/resid_post"]
  act = jax.jit(lambda p: core.activation_patch(spec, p, batch, batch, num, readout, names))(params)
  for name in names:
    for v in act[name].values():
      np.testing.assert_array_equal(np.asarray(v), 0.0)


# --------------------------------------------------------------------------
# A tiny trained-shape model (few-shot, LayerNorm, RoPE): effects against two
# forward passes with hand-built clamp trees and plain numpy.


def np_layer_norm(x, scale, bias, eps=1e-6):  # flax nn.LayerNorm's definition
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_rope(x, base=10000.0):  # x [B, T, dh]: pairs (2i, 2i+1) rotated by pos * base^(-2i/dh)
  t, dh = x.shape[1], x.shape[-1]
  ang = np.arange(t)[:, None] * base ** (-np.arange(0, dh, 2) / dh)[None]
  c, s = np.cos(ang), np.sin(ang)
  out = np.empty_like(x)
  out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
  out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
  return out


def np_logit_diff(logits, labels):
  """Few-shot query: target label minus the other context label (rows without one skipped)."""
  q = np.asarray(logits)[:, -1]
  target = labels[:, -1]
  diffs = []
  for b in range(len(q)):
    other = [l for l in labels[b, :-1] if l != target[b]]
    if other:
      diffs.append(q[b, target[b]] - q[b, other[0]])
  return float(np.mean(diffs))


@pytest.fixture(scope="module")
def fewshot():
  pg = build.prepare(tiny_config()).groups[0]
  spec = pg.static.model
  params = jax.device_get(model_lib.init_params(spec, 3))
  # Larger weights than the initialisation so that the effects are well above rounding.
  params = jax.tree.map(lambda x: 3.0 * x, params)
  batch = jax.tree.map(lambda x: x[0], measures.eval_batch(pg.static, pg.table, pg.props, 32))
  return pg, spec, params, batch, pg.props.data.num_outputs[0]


def test_each_path_effect_is_the_difference_of_two_forward_passes(fewshot):
  pg, spec, params, batch, num = fewshot
  corrupted, readout = corrupt.permute_labels(batch)
  edges = core.Edges.every(spec)
  out = jax.jit(lambda p: core.path_patch(spec, p, batch, corrupted, num, readout, edges))(params)
  labels = np.asarray(batch.labels)
  clean_logits, clean = model_lib.apply(spec, params, batch, num)
  _, corr = model_lib.apply(spec, params, corrupted, num)
  f_clean = np_logit_diff(clean_logits, labels)
  np.testing.assert_allclose(float(out["base"]["logit_diff"]), f_clean, rtol=1e-5, atol=1e-6)
  l1 = params["layer_1"]
  checked = []
  for si, (sl, sh) in enumerate(edges.senders):
    dz = np.asarray(corr[f"layer_{sl}"]["attn"]["z"])[:, :, sh] - \
        np.asarray(clean[f"layer_{sl}"]["attn"]["z"])[:, :, sh]
    delta = dz @ np.asarray(params[f"layer_{sl}"]["attn"]["w_o"][sh])  # [B, T, d]
    if sl == 0:
      x = np_layer_norm(np.asarray(clean["layer_1"]["resid_pre"]) + delta,
                        np.asarray(l1["ln"]["scale"]), np.asarray(l1["ln"]["bias"]))
      for ri, (rl, rh) in enumerate(edges.receivers):
        for ii, name in enumerate(edges.inputs):
          new = x @ np.asarray(l1["attn"][f"w_{name}"][:, rh])  # [B, T, dh]
          if name != "v":
            new = np_rope(new)
          full = np.array(clean["layer_1"]["attn"][name])
          full[:, :, rh] = new
          mask = np.zeros((1, 1, H, 1), bool)
          mask[0, 0, rh] = True
          logits, _ = model_lib.apply(spec, params, batch, num,
                                      {"layer_1": {"attn": {name: Clamp(full, mask)}}})
          ref = np_logit_diff(logits, labels) - f_clean
          got = float(out["heads"]["logit_diff"][si, ri, ii])
          # float32 throughout: the library's patched value is clean + (f(r') - f(r)),
          # the reference's f(r') directly, so they differ by rounding of order
          # 1e-6 of the activations; effects here are 1e-3 to 1.
          np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-5)
          checked.append(abs(ref))
    final = np.asarray(clean["layer_1"]["resid_post"]) + delta
    logits, _ = model_lib.apply(spec, params, batch, num,
                                {"layer_1": {"resid_post": Clamp(final, True)}})
    ref = np_logit_diff(logits, labels) - f_clean
    np.testing.assert_allclose(float(out["logits"]["logit_diff"][si]), ref, rtol=2e-3, atol=2e-5)
    checked.append(abs(ref))
  assert max(checked) > 1e-2  # the comparison is not between zeros


def test_knockouts_faithfulness_and_the_all_knocked_out_baseline(fewshot):
  pg, spec, params, batch, num = fewshot
  readout = corrupt.permute_labels(batch)[1]
  labels = np.asarray(batch.labels)
  full = np.ones((spec.num_layers, spec.num_heads), bool)
  means = core.head_means(spec, params, batch, num)
  key = jax.random.PRNGKey(0)
  fn = jax.jit(lambda p, m: core.circuit_scores(spec, p, batch, num, readout, full, m, key, 2))
  s = fn(params, means)
  clean_logits, acts = model_lib.apply(spec, params, batch, num)
  # The full model's circuit is the model: the same program computes F(C) and F(M).
  assert float(s["faithfulness"]) == 1.0
  np.testing.assert_allclose(float(s["F_model"]), np_logit_diff(clean_logits, labels), rtol=1e-5)
  assert float(s["completeness"]) == 0.0
  # Zero ablation of every head: the embedding alone through the final
  # LayerNorm and the unembedding, written out in numpy.
  z = jax.jit(lambda p: core.circuit_scores(spec, p, batch, num, readout, full, None, key, 2))(params)
  emb = np.asarray(acts["embed"])[:, 0::2]  # the few-shot read-out rows
  x = np_layer_norm(emb, np.asarray(params["ln_final"]["scale"]), np.asarray(params["ln_final"]["bias"]))
  logits = x @ np.asarray(params["unembed"]["kernel"]) + np.asarray(params["unembed"]["bias"])
  logits[..., int(num):] = -np.inf
  # float32 forward vs float64 numpy: rounding of order 1e-6 on logits of order 1.
  np.testing.assert_allclose(float(z["F_empty"]), np_logit_diff(logits, labels), rtol=1e-4, atol=1e-5)
  # Mean ablation of every head: each head writes its mean over the reference batch.
  zbar = np.asarray(means)  # [L, T, H, dh]
  resid = np.asarray(acts["embed"])
  for l in range(spec.num_layers):
    resid = resid + np.einsum("the,hed->td", zbar[l], np.asarray(params[f"layer_{l}"]["attn"]["w_o"]))
  x = np_layer_norm(resid[:, 0::2], np.asarray(params["ln_final"]["scale"]),
                    np.asarray(params["ln_final"]["bias"]))
  logits = x @ np.asarray(params["unembed"]["kernel"]) + np.asarray(params["unembed"]["bias"])
  logits[..., int(num):] = -np.inf
  np.testing.assert_allclose(float(s["F_empty"]), np_logit_diff(logits, labels), rtol=1e-4, atol=1e-5)
  # Minimality is defined on the circuit's heads only.
  part = full.copy()
  part[1, 1] = False
  m = jax.jit(lambda p: core.circuit_scores(spec, p, batch, num, readout, part, means, key, 2))(params)
  assert np.isnan(np.asarray(m["minimality"])[1, 1])
  assert np.all(np.isfinite(np.asarray(m["minimality"])[part]))


def np_mean_ablated_logits(spec, params, acts, num):
  """The all-knocked-out mean-ablation baseline in numpy: the embedding plus every
  head's mean output (over the batch, per position), read by the unembedding."""
  resid = np.asarray(acts["embed"])
  for l in range(spec.num_layers):
    zbar = np.asarray(acts[f"layer_{l}"]["attn"]["z"]).mean(0)  # [T, H, dh]
    resid = resid + np.einsum("the,hed->td", zbar, np.asarray(params[f"layer_{l}"]["attn"]["w_o"]))
  x = np_layer_norm(resid[:, 0::2], np.asarray(params["ln_final"]["scale"]),
                    np.asarray(params["ln_final"]["bias"]))
  logits = x @ np.asarray(params["unembed"]["kernel"]) + np.asarray(params["unembed"]["bias"])
  logits[..., int(num):] = -np.inf
  return logits


def test_edge_ablation_is_the_two_pass_reference(fewshot):
  """A random edge set, mean-ablated path by path, against the forward passes
  written out: layer-1 q, k, v per head from its own residual stream (numpy),
  then the logits from the final stream with the ablated direct paths."""
  pg, spec, params, batch, num = fewshot
  labels = np.asarray(batch.labels)
  nl, h = spec.num_layers, spec.num_heads
  n = nl * h
  rng = np.random.default_rng(0)
  keep = core.EdgeSet(heads=rng.random((n, n, 3)) < 0.5, logits=rng.random(n) < 0.5)
  means = core.head_means(spec, params, batch, num)
  got = jax.jit(lambda p: core.edge_ablate(spec, p, batch, num, keep, means))(params)
  _, acts = model_lib.apply(spec, params, batch, num)  # pass 1: layer 0 reads only the embedding
  zbar = [np.asarray(acts[f"layer_{l}"]["attn"]["z"]).mean(0) for l in range(nl)]
  w_o = [np.asarray(params[f"layer_{l}"]["attn"]["w_o"]) for l in range(nl)]
  l1 = params["layer_1"]
  resid1 = np.asarray(acts["layer_1"]["resid_pre"])
  z0 = np.asarray(acts["layer_0"]["attn"]["z"])
  clamps = {}
  for i, name in enumerate(core.INPUTS):
    full = np.array(acts["layer_1"]["attn"][name])
    for r in range(h):
      resid = resid1.copy()
      for s in range(h):  # senders: layer-0 heads
        if not keep.heads[s, h + r, i]:
          resid += (zbar[0][None, :, s] - z0[:, :, s]) @ w_o[0][s]
      x = np_layer_norm(resid, np.asarray(l1["ln"]["scale"]), np.asarray(l1["ln"]["bias"]))
      y = x @ np.asarray(l1["attn"][f"w_{name}"][:, r])
      full[:, :, r] = np_rope(y) if name != "v" else y
    clamps[name] = Clamp(full, True)
  _, acts2 = model_lib.apply(spec, params, batch, num, {"layer_1": {"attn": clamps}})  # pass 2
  final = np.array(acts2["layer_1"]["resid_post"])
  for s in range(n):
    l, hh = divmod(s, h)
    if not keep.logits[s]:
      final += (zbar[l][None, :, hh] - np.asarray(acts2[f"layer_{l}"]["attn"]["z"])[:, :, hh]) @ w_o[l][hh]
  logits, _ = model_lib.apply(spec, params, batch, num,  # pass 3
                              {"layer_1": {"attn": clamps, "resid_post": Clamp(final, True)}})
  ref = np_logit_diff(logits, labels)
  full_model = np_logit_diff(model_lib.apply(spec, params, batch, num)[0], labels)
  assert abs(ref - full_model) > 1e-2  # the ablation changes the metric
  # float32 both ways; the library adds f(r') - f(r) to the model's q, k, v,
  # the reference writes f(r'): rounding of order 1e-6 of the activations.
  np.testing.assert_allclose(np_logit_diff(got, labels), ref, rtol=1e-3, atol=1e-5)


def test_edge_scores_full_circuit_and_the_all_ablated_baseline(fewshot):
  pg, spec, params, batch, num = fewshot
  readout = corrupt.permute_labels(batch)[1]
  labels = np.asarray(batch.labels)
  full = core.flat_edges(core.every_edge(spec))
  index = jnp.asarray(np.r_[np.nonzero(np.asarray(full))[0][[0, 5, -1]], -1])
  means = core.head_means(spec, params, batch, num)
  key = jax.random.PRNGKey(0)
  fn = jax.jit(lambda p, c: core.edge_scores(spec, p, batch, num, readout, c, index, means, key, 2))
  s = fn(params, full)
  clean_logits, acts = model_lib.apply(spec, params, batch, num)
  # Every edge kept reproduces the model bitwise, in the same program as F(C).
  assert float(s["faithfulness"]) == 1.0 and float(s["completeness"]) == 0.0
  np.testing.assert_allclose(float(s["F_model"]), np_logit_diff(clean_logits, labels), rtol=1e-5)
  # Every edge ablated: the embedding plus every head's mean, written out in numpy.
  base = np_logit_diff(np_mean_ablated_logits(spec, params, acts, num), labels)
  np.testing.assert_allclose(float(s["F_empty"]), base, rtol=1e-4, atol=1e-5)
  empty = fn(params, jnp.zeros_like(full))
  np.testing.assert_allclose(float(empty["F_circuit"]), base, rtol=1e-4, atol=1e-5)
  mini = np.asarray(s["minimality"])
  assert np.all(np.isfinite(mini[:3])) and np.isnan(mini[3]) and np.max(mini[:3]) > 0


def test_edge_circuit_sets_follow_the_definitions():
  valid = jnp.asarray([True, True, True, False, True, True])
  c = jnp.asarray([True, False, True, True, True, False])  # entry 3 is not an edge
  index = jnp.asarray([0, 2, -1])
  sets = jax.device_get(core.edge_circuit_sets(c, valid, index, jax.random.PRNGKey(1), 4))
  cc = np.asarray(c & valid)
  np.testing.assert_array_equal(sets["fixed"], [np.asarray(valid), cc, np.zeros(6, bool)])
  comp = sets["complete"]  # kept: C \ K, M \ K
  k = cc & ~comp[0]
  np.testing.assert_array_equal(comp[1], np.asarray(valid) & ~k)
  np.testing.assert_array_equal(comp[0][0], np.zeros(6, bool))  # the first K is C
  mini = sets["minimal"]  # kept: C \ (K + e), C \ K
  for p, e in enumerate([0, 2]):
    np.testing.assert_array_equal(mini[1, p, 0], cc)  # the first K is empty
    assert np.all(mini[1, p, :, e]) and not np.any(mini[0, p, :, e])
    np.testing.assert_array_equal(np.delete(mini[0, p], e, 1), np.delete(mini[1, p], e, 1))
  np.testing.assert_array_equal(mini[0, 2], mini[1, 2])  # padding: no edge removed (scored NaN)


# Compiles path patching under a clamp plan and without: 13-16 s on 2 cores,
# over the default suite's budget, hence slow.
@pytest.mark.slow
def test_patching_runs_under_the_training_clamps():
  """keep_head=0 ablates layer-1 head 1 in training; the patched model must too."""
  pg = build.prepare(tiny_config(), ["clamp.keep_head=-1,0"]).groups[0]
  spec, static = pg.static.model, pg.static
  assert static.plan is not None
  params = jax.device_get(jax.tree.map(lambda x: 3.0 * x, model_lib.init_params(spec, 3)))
  r = 1  # the clamped run
  props = jax.tree.map(lambda x: x[r], pg.props)
  batch = jax.tree.map(lambda x: x[r], measures.eval_batch(static, pg.table, pg.props, 16))
  corrupted, readout = corrupt.permute_labels(batch)
  # Only the receiver the clamp silences, to keep the two programs small.
  edges = core.Edges(senders=core.Edges.every(spec).senders, receivers=((1, 1),))
  num = props.data.num_outputs

  def patch(plan):
    return jax.jit(lambda p, c: core.path_patch(spec, p, batch, corrupted, num, readout, edges,
                                                plan=plan, clamp_params=c))(params, props.clamp)
  on, off = patch(static.plan), patch(None)
  trained, _ = jax.jit(lambda p, c: static.plan.forward(spec, p, batch, num, c))(params, props.clamp)
  # Two programs (the patching one batches the pass): float32 rounding apart.
  np.testing.assert_allclose(on["base"]["logit_diff"],
                             core.readout_metrics(trained, readout)["logit_diff"], rtol=1e-5)
  assert abs(float(off["base"]["logit_diff"]) - float(on["base"]["logit_diff"])) > 1e-3
  # Under the clamp, L1H1's output is ablated: no path into it or out of it carries anything.
  ri = edges.receivers.index((1, 1))
  np.testing.assert_array_equal(np.asarray(on["heads"]["logit_diff"])[:2, ri], 0.0)
  assert float(on["logits"]["logit_diff"][3]) == 0.0
  assert np.max(np.abs(np.asarray(off["heads"]["logit_diff"])[:2, ri])) > 1e-3


def test_circuit_sets_follow_the_definitions():
  c = np.zeros((2, 3), bool)
  c[0, 1] = c[1, 0] = c[1, 2] = True
  sets = jax.device_get(core.circuit_sets(jnp.asarray(c), jax.random.PRNGKey(1), 5))
  np.testing.assert_array_equal(sets["fixed"][1], ~c)
  comp = sets["complete"]  # [2, n, L, H]: knocked out for C \ K and for M \ K
  k = comp[1]
  assert np.all(k <= c)  # K inside C
  np.testing.assert_array_equal(comp[0], ~c | k)
  np.testing.assert_array_equal(k[0], c)  # the first K is C itself
  mini = sets["minimal"]  # [2, V, n, L, H]
  for v in range(6):
    onehot = np.eye(6, dtype=bool)[v].reshape(2, 3)
    np.testing.assert_array_equal(mini[0, v], mini[1, v] | onehot)
    assert not np.any(mini[1, v] & ~(~c) & onehot)  # v itself is never in K
    np.testing.assert_array_equal(mini[1, v, 0], ~c)  # the first K is empty


# --------------------------------------------------------------------------
# Whole-group program and corruptions.


def test_the_group_program_equals_the_per_run_result():
  pg2 = build.prepare(tiny_config(**{
      "task.name": "repeat_tokens", "tokens.seq_len": T, "tokens.vocab_size": V,
      "tokens.segment_len": 3, "tokens.num_repeats": 1, "model.d_model": 16}),
      ["seeds.init=0,1", "tokens.vocab_size=12,20"]).groups[0]
  spec = pg2.static.model
  params = jax.device_get(jax.vmap(lambda s: model_lib.init_params(spec, s))(
      jnp.asarray(pg2.props.init_seed)))
  data = program_lib.make_data(pg2.static, pg2.table, pg2.props, "break_copies", 16)
  edges = core.Edges.every(spec)
  fn = program_lib.path_program(pg2.static, edges, chunk=1)
  grid = jax.device_get(fn(program_lib.stack_block([params], 1), data))
  for r in range(2):
    one = lambda x: x[r]  # noqa: E731
    single = jax.jit(lambda p, c, k, ro, n: core.path_patch(spec, p, c, k, n, ro, edges))(
        jax.tree.map(one, params), jax.tree.map(one, data.clean), jax.tree.map(one, data.corrupted),
        jax.tree.map(one, data.readout), data.num_outputs[r])
    for part in ("heads", "logits", "base"):
      for metric, v in single[part].items():
        # Batched and unbatched programs may round differently (float32).
        np.testing.assert_allclose(grid[part][metric][0, r], v, rtol=1e-5, atol=1e-6)


# A subprocess with 2 CPU devices compiling the group program and 3 per-run
# programs: about 40 s on 2 cores, hence slow.
@pytest.mark.slow
def test_the_group_program_pads_and_splits_runs_over_devices():
  out = run_python("""
import jax, jax.numpy as jnp, numpy as np
from icldyn import build, model as model_lib
from icldyn.config import base_config, set_field
from icldyn.patching import core, program
c = base_config()
for k, v in {"model.d_model": 16, "model.num_heads": 2, "data.dim": 16, "data.num_labels": 5,
             "data.num_train_classes": 12, "data.num_test_classes": 6, "eval.size": 32,
             "eval.batch": 32}.items():
  set_field(c, k, v)
pg = build.prepare(c, ["seeds.init=0,1,2"]).groups[0]
spec, edges = pg.static.model, core.Edges.every(pg.static.model)
params = jax.device_get(jax.vmap(lambda s: model_lib.init_params(spec, s))(
    jnp.asarray(pg.props.init_seed)))
data = program.make_data(pg.static, pg.table, pg.props, None, 8)
assert len(jax.devices()) == 2
grid = jax.device_get(program.path_program(pg.static, edges, chunk=1)(
    program.stack_block([params], 1), data))
single = jax.jit(lambda p, c, k, ro, n: core.path_patch(spec, p, c, k, n, ro, edges))
for r in range(3):
  one = lambda x: x[r]
  ref = single(jax.tree.map(one, params), jax.tree.map(one, data.clean),
               jax.tree.map(one, data.corrupted), jax.tree.map(one, data.readout),
               data.num_outputs[r])
  for part in ("heads", "logits", "base"):
    np.testing.assert_allclose(grid[part]["logit_diff"][0, r], ref[part]["logit_diff"],
                               rtol=1e-5, atol=1e-6)
print("OK", grid["heads"]["logit_diff"].shape)
""", devices=2)
  assert "OK (1, 3, 4, 2, 3)" in out, out


@pytest.mark.slow  # about 25 s on 2 cores
def test_fewshot_corruptions():
  pg = build.prepare(tiny_config(), ["data.burstiness=1"]).groups[0]
  b = jax.tree.map(lambda x: x[0], measures.eval_batch(pg.static, pg.table, pg.props, 64))
  perm, ro = corrupt.permute_labels(b)
  lab, new = np.asarray(b.labels), np.asarray(perm.labels)
  np.testing.assert_array_equal(new[:, -1], lab[:, -1])
  for i in range(len(lab)):
    distinct = sorted(set(lab[i, :-1]))
    mapping = {x: distinct[(j + 1) % len(distinct)] for j, x in enumerate(distinct)}
    assert list(new[i, :-1]) == [mapping[x] for x in lab[i, :-1]]
  np.testing.assert_array_equal(np.asarray(perm.inputs), np.asarray(b.inputs))
  assert np.all(np.asarray(ro.weight)[:, :-1] == 0) and np.all(np.asarray(ro.weight)[:, -1] == 1)
  q, _ = corrupt.query_class(b)
  cls = np.asarray(q.classes)
  assert np.mean([cls[i, -1] not in cls[i, :-1] for i in range(len(cls))]) == 1.0
  np.testing.assert_array_equal(cls[:, :-1], np.asarray(b.classes)[:, :-1])
  np.testing.assert_array_equal(np.asarray(q.inputs)[:, :-1], np.asarray(b.inputs)[:, :-1])
  cx, _ = corrupt.context_exemplars(b)
  ccls = np.asarray(cx.classes)
  assert all(ccls[i, -1] not in ccls[i, :-1] for i in range(len(ccls)))
  np.testing.assert_array_equal(np.asarray(cx.labels), lab)
  np.testing.assert_array_equal(np.asarray(cx.inputs)[:, -1], np.asarray(b.inputs)[:, -1])
  for c in (q, cx):
    if c.table_rows is not None:  # the rows still index the inputs
      np.testing.assert_array_equal(np.asarray(c.table_rows.x)[np.asarray(c.table_rows.index)],
                                    np.asarray(c.inputs))


def test_token_corruptions(induction):
  _, _, b, _ = induction
  br, ro = corrupt.break_copies(b)
  tok, rep, new = np.asarray(b.tokens), np.asarray(b.repeated), np.asarray(br.tokens)
  in_copy = rep | np.concatenate([np.zeros_like(rep[:, :1]), rep[:, :-1]], 1)
  np.testing.assert_array_equal(new[~in_copy], tok[~in_copy])
  np.testing.assert_array_equal(new[in_copy], np.roll(tok, -1, 0)[in_copy])
  np.testing.assert_array_equal(np.asarray(ro.target)[:, :-1], tok[:, 1:])
  np.testing.assert_array_equal(np.asarray(ro.weight), rep.astype(np.float32))
  rs, _ = corrupt.resample(b)
  np.testing.assert_array_equal(np.asarray(rs.tokens), np.roll(tok, -1, 0))
  with pytest.raises(ConfigError, match="--corruption"):
    corrupt.get("repeat_tokens", "permute_labels")


# --------------------------------------------------------------------------
# The command.


@pytest.fixture(scope="module")
def token_workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("patch") / "wd")
  cfg = tiny_config(**{"task.name": "repeat_tokens", "tokens.seq_len": 16, "tokens.vocab_size": 8,
                       "tokens.segment_len": 4, "tokens.num_repeats": 1, "train.num_sequences": 480,
                       "checkpoint.every": 160})
  runner.train(cfg, path, ["seeds.init=0,1"], quiet=True)
  return path


# Training a workdir and compiling both programs takes about a minute on 2
# cores: the command's end-to-end tests run with `make test-slow`; the
# library they call is covered above.
@pytest.mark.slow
def test_patch_command_writes_the_matrix_timings_and_scores(token_workdir, capsys):
  rc = cli.main(["patch", "--workdir", token_workdir, "--corruption", "resample",
                 "--circuit", "L0H0->L1H1.k,L1H1->logits", "--size", "16"])
  assert rc == 0
  table = pd.read_csv(os.path.join(token_workdir, wd_lib.PATCHING_CSV))
  assert list(table.columns) == list(wd_lib.PATCHING_COLUMNS)
  steps = sorted(table["step"].unique())
  assert len(steps) >= 3
  # per step, run, metric: 2 unpatched rows, 2x2 senders x 2 receivers x 3 inputs... every
  # layer-0 head to every layer-1 head through q, k, v (12) and every head to the logits (4).
  per = table.groupby(["step", "run", "metric"]).size()
  assert set(per) == {2 + 12 + 4}
  edges = set(table["sender"] + "->" + table["receiver"].fillna("") + "." + table["input"].fillna(""))
  assert "L0H1->L1H0.v" in edges and "L1H1->logits." in edges
  phases = pd.read_csv(os.path.join(token_workdir, wd_lib.PHASE_CHANGES_CSV))
  ours = phases[phases["curve"].str.startswith("patching/")]
  assert set(ours["curve"]) <= {"patching/L0H0->L1H1.k", "patching/L1H1->logits"}
  assert len(ours) > 0 and set(ours["run"]) <= {0, 1}
  summ = pd.read_csv(os.path.join(token_workdir, wd_lib.SUMMARY_CSV))  # summarised per setting
  assert set(summ[summ["curve"].str.startswith("patching/")]["curve"]) == set(ours["curve"])
  circ = pd.read_csv(os.path.join(token_workdir, wd_lib.CIRCUIT_CSV))
  assert list(circ.columns) == list(wd_lib.CIRCUIT_COLUMNS)
  assert set(circ["score"]) >= {"faithfulness", "completeness", "minimality", "F_empty"}
  assert set(circ["level"]) == {"edges"}  # the default: the circuit's edges
  mini = circ[circ["score"] == "minimality"]
  assert set(mini["node"]) == {"L0H0->L1H1.k", "L1H1->logits"}
  meta = json.load(open(os.path.join(token_workdir, command.PATCHING_JSON)))
  assert meta["corruption"] == "resample"
  assert "Circuit edges by run" in capsys.readouterr().out
  # A second run replaces its own phase rows and keeps the others.
  before = len(phases) - len(ours)
  cli.main(["patch", "--workdir", token_workdir, "--size", "16", "--no-scores", "--quiet"])
  again = pd.read_csv(os.path.join(token_workdir, wd_lib.PHASE_CHANGES_CSV))
  assert len(again[~again["curve"].str.startswith("patching/")]) == before


@pytest.mark.slow
@pytest.mark.parametrize("args, field", [
    (["--corruption", "permute_labels"], "--corruption"),
    (["--senders", "L5H0"], "--senders"),
    (["--inputs", "q,x"], "--inputs"),
    (["--circuit", "L0H0->L1H1"], "--circuit"),
    (["--circuit", "L1H0->L1H1.k"], "--circuit"),
    (["--chunk", "-1"], "--chunk"),
])
def test_patch_bad_input_is_one_line(token_workdir, capsys, args, field):
  assert cli.main(["patch", "--workdir", token_workdir, *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"icldyn: error: {field}:"), err
