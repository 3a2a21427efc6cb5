"""Tests for icldyn.clamps: every clamp of the catalogue against an independent
computation, gradients, composition, the config forms and grids.

Compilation dominates on CPU, so the catalogue is one grid: every clamp is a
run of one plan, compiled once for the forward pass and once for gradients
(which is itself the property under test: runs differing in clamps share a
program). The references are numpy code or the plain model on edited
parameters, never the clamp code.
"""

import csv
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icldyn import build
from icldyn import clamps as C
from icldyn import config as config_lib
from icldyn import model as model_lib
from icldyn import runner
from icldyn import sharding as sharding_lib
from icldyn import step as train_lib
from icldyn.errors import ConfigError
from icldyn.store import checkpoints as ckpt_lib
from icldyn.tasks import fewshot
from icldyn.tasks import fewshot as data_lib
from icldyn.tasks import scores


def tiny_config(num_heads=4):
  c = config_lib.base_config()
  with c.unlocked():
    c.model.num_heads = num_heads
    c.model.d_model = 16
    c.data.dim = 8
    c.data.num_train_classes = 10
    c.data.num_test_classes = 4
    c.data.num_labels = 5
    c.data.label_holdout = 0.0
    c.train.num_sequences = 64
    c.train.batch_size = 8
    c.train.eval_every = 64
    c.train.learning_rate = 1e-3
    c.eval.size = 16
    c.eval.batch = 16
    c.eval.evaluators = "fsl_train"
    c.checkpoint.every = 64
    c.checkpoint.resume_every = 0
  return c


CFG = tiny_config()
SPEC = build.model_spec(CFG)  # 2 layers, 4 heads, d 16, C 2 (T 5), 5 labels
L, H, T = SPEC.num_layers, SPEC.num_heads, SPEC.seq_len


def random_params(seed):
  shapes = jax.eval_shape(lambda: model_lib.init_params(SPEC, 0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32), shapes)


PARAMS = random_params(0)
DONOR = random_params(1)


def make_batch():
  # Per sequence: classes of the two context exemplars and the query, and labels.
  classes = np.array([[0, 1, 0], [1, 0, 0], [2, 2, 2], [1, 2, 0], [0, 1, 1], [3, 0, 0]], np.int32)
  labels = np.array([[2, 4, 2], [3, 1, 1], [0, 0, 0], [1, 3, 4], [4, 2, 2], [0, 1, 1]], np.int32)
  rng = np.random.default_rng(2)
  means = rng.normal(size=(4, SPEC.front.input_dim))
  inputs = means[classes] + 0.3 * rng.normal(size=classes.shape + (SPEC.front.input_dim,))
  return data_lib.Batch(inputs.astype(np.float32), labels, classes)


BATCH = make_batch()
B = BATCH.labels.shape[0]

# The catalogue: one run per case, all in one plan.
CASES = {
    "none": [],
    "ablate_v": [C.AblateHeads(layer=1, heads=(0, 2))],
    "ablate_z": [C.AblateHeads(layer=1, heads=(0, 2), site="z")],
    "prev_token": [C.PrevTokenPattern(layer=0, heads=(1,), strength=0.8)],
    "prev_token_labels": [C.PrevTokenPattern(layer=0, heads=(1, 3), strength=0.6, only_labels=True)],
    "induction": [C.InductionPattern(layer=1, heads=(2,), strength=0.9)],
    "disallow": [C.DisallowPrevToken(layer=0, heads=(0,))],
    "disallow_labels": [C.DisallowPrevToken(layer=0, heads=(3,), only_labels=True)],
    "match": [C.MatchPattern(layer=1, heads=(1,)), C.MatchPattern(layer=1, heads=(3,), temperature=0.5)],
    "temperature": [C.HeadTemperature(layer=0, heads=(2,), temperature=0.5)],
    "silence": [C.SilenceNonLabel(heads=(0, 3))],
    "copy": [C.CopyFromHead(head=1)],
    "preserve_all": [C.Preserve(what=("pattern", "scores", "q", "k", "v", "z"))],
    "preserve_pattern_ablate": [C.Preserve(what=("pattern",)), C.AblateHeads(layer=0)],
    "preserve_value_ablate": [C.Preserve(what=("v",)), C.AblateHeads(layer=0)],
    "preserve_yields": [C.Preserve(what=("pattern",)), C.DisallowPrevToken(layer=0, heads=(0,))],
    "layer1": [C.Layer1Clamp()],
    "layer1_copy": [C.Layer1Clamp(), C.CopyFromHead(head=2)],
    "graft_in": [C.GraftIn(layer=0, params=DONOR)],
    "graft_out": [C.GraftOut(layer=0, params=DONOR)],
}
NAMES = list(CASES)
PLAN, CLAMP_PARAMS = C.build(SPEC, list(CASES.values()))


def loss(params, clamp_params):
  logits, _ = PLAN.forward(SPEC, params, BATCH, SPEC.num_outputs, clamp_params)
  return jnp.mean(fewshot.query_xent(logits[:, -1], BATCH.labels[:, -1]))




def per_run(params):
  """Parameters copied onto the run axis, as in training (every pass then runs
  batched over runs; with shared, unbatched parameters XLA computes the
  unclamped first pass once, in kernels that may round differently)."""
  return jax.tree.map(lambda x: np.broadcast_to(x, (len(NAMES),) + x.shape), params)


FORWARD = jax.jit(jax.vmap(lambda p, cp: PLAN.forward(SPEC, p, BATCH, SPEC.num_outputs, cp)))
PLAIN = jax.jit(lambda p: fewshot.apply(SPEC, p, BATCH.inputs, BATCH.labels, SPEC.num_outputs))


@pytest.fixture(scope="module")
def out():
  """{case: (logits, acts)} of the catalogue grid (host arrays)."""
  logits, acts = jax.device_get(FORWARD(per_run(PARAMS), CLAMP_PARAMS))
  return {n: jax.tree.map(lambda x: x[i], (logits, acts)) for i, n in enumerate(NAMES)}


@pytest.fixture(scope="module")
def grads():
  g = jax.device_get(jax.jit(jax.vmap(jax.grad(loss)))(per_run(PARAMS), CLAMP_PARAMS))
  return {n: jax.tree.map(lambda x: x[i], g) for i, n in enumerate(NAMES)}


@pytest.fixture(scope="module")
def plain():
  return jax.device_get(PLAIN(PARAMS))


def attn(acts, layer, name="pattern"):
  return np.asarray(acts[f"layer_{layer}"]["attn"][name])


def softmax(x):
  x = np.asarray(x, np.float64)
  m = np.max(x, -1, keepdims=True)
  e = np.exp(x - m)
  return e / e.sum(-1, keepdims=True)


def zero(tree) -> bool:
  return all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# Each clamp against an independent computation.


def test_no_clamp_run_equals_plain_model(out, plain):
  # A run whose masks are all False, in a program full of other clamps.
  np.testing.assert_allclose(out["none"][0], plain[0], rtol=1e-6, atol=1e-6)


def test_ablated_heads_have_no_effect(out):
  edited = jax.tree.map(np.copy, PARAMS)
  edited["layer_1"]["attn"]["w_o"][[0, 2]] = 0.0  # independent: remove the heads' output
  ref = jax.device_get(PLAIN(edited))[0]
  for case in ("ablate_v", "ablate_z"):
    np.testing.assert_allclose(out[case][0], ref, rtol=1e-6, atol=1e-6)
  assert np.all(attn(out["ablate_v"][1], 1, "v")[:, :, [0, 2]] == 0)
  assert np.all(attn(out["ablate_z"][1], 1, "z")[:, :, [0, 2]] == 0)
  # Scrambling every parameter of the ablated heads changes nothing, bitwise.
  scrambled = jax.tree.map(np.copy, PARAMS)
  rng = np.random.default_rng(5)
  for w in ("w_q", "w_k", "w_v"):
    scrambled["layer_1"]["attn"][w][:, [0, 2]] = rng.normal(size=(16, 2, 4))
  scrambled["layer_1"]["attn"]["w_o"][[0, 2]] = rng.normal(size=(2, 4, 16))
  logits2 = jax.device_get(FORWARD(per_run(scrambled), CLAMP_PARAMS))[0]
  for case in ("ablate_v", "ablate_z"):
    np.testing.assert_array_equal(logits2[NAMES.index(case)], out[case][0])


def prev_token_matrix(s):
  s = np.float32(s)
  m = np.zeros((T, T), np.float32)
  m[0, 0] = 1
  for i in range(1, T):
    m[i, i], m[i, i - 1] = np.float32(1) - s, s
  return m


def test_prev_token_pattern_exact(out):
  p = attn(out["prev_token"][1], 0)
  np.testing.assert_array_equal(p[:, 1], np.broadcast_to(prev_token_matrix(0.8), (B, T, T)))
  np.testing.assert_array_equal(p[:, [0, 2, 3]], attn(out["none"][1], 0)[:, [0, 2, 3]])
  q = attn(out["prev_token_labels"][1], 0)
  ref = attn(out["none"][1], 0)
  for h in (1, 3):
    np.testing.assert_array_equal(q[:, h, 1::2], np.broadcast_to(prev_token_matrix(0.6)[1::2], (B, 2, T)))
    np.testing.assert_array_equal(q[:, h, 0::2], ref[:, h, 0::2])  # exemplar rows computed


def test_induction_pattern_exact(out):
  p = attn(out["induction"][1], 1)[:, 2, -1]  # [B, T], query row of head 2
  s = np.float32(0.9)
  want = np.zeros((B, T), np.float32)
  for b in range(B):
    correct = BATCH.classes[b, :-1] == BATCH.classes[b, -1]
    for i, ok in enumerate(correct):
      if correct.all():
        want[b, 2 * i + 1] = np.float32(1) / np.float32(2)
      elif not correct.any():
        want[b, 2 * i + 1] = np.float32(1) / np.float32(2)
      else:
        want[b, 2 * i + 1] = s if ok else np.float32(1) - s
  np.testing.assert_array_equal(p, want)
  # Two pairs, one correct: the paper's induction strength 2s - 1.
  strength = np.asarray(scores.induction_rows(attn(out["induction"][1], 1),
                                              SPEC.front.targets(BATCH))[0])
  np.testing.assert_allclose(strength[[0, 1, 4, 5], 2], 2 * 0.9 - 1, rtol=1e-6)
  np.testing.assert_array_equal(attn(out["induction"][1], 1)[:, 2, :-1],
                                attn(out["none"][1], 1)[:, 2, :-1])


def test_disallow_prev_token(out):
  scores = attn(out["none"][1], 0, "scores")
  for case, head, rows in (("disallow", 0, range(1, T)), ("disallow_labels", 3, range(1, T, 2))):
    ref = scores[:, head].astype(np.float64).copy()
    for i in rows:
      ref[:, i, i - 1] = -np.inf
    p = attn(out[case][1], 0)[:, head]
    np.testing.assert_allclose(p, softmax(ref), rtol=1e-6, atol=1e-7)
    assert all(np.all(p[:, i, i - 1] == 0) for i in rows)


def test_match_pattern(out):
  x = BATCH.inputs.astype(np.float64)
  xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
  sims = np.einsum("bcd,bd->bc", xn[:, :-1], xn[:, -1])
  p = attn(out["match"][1], 1)
  hard = (sims == sims.max(-1, keepdims=True)).astype(float)
  np.testing.assert_allclose(p[:, 1, -1, 1::2], hard / hard.sum(-1, keepdims=True), atol=1e-7)
  np.testing.assert_allclose(p[:, 3, -1, 1::2], softmax(sims / 0.5), rtol=1e-5)
  assert np.all(p[:, [1, 3], -1, 0::2] == 0)


def test_head_temperature(out):
  scores = attn(out["none"][1], 0, "scores")
  p = attn(out["temperature"][1], 0)
  np.testing.assert_allclose(p[:, 2], softmax(scores[:, 2] / 0.5), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(p[:, [0, 1, 3]], attn(out["none"][1], 0)[:, [0, 1, 3]])
  np.testing.assert_array_equal(out["temperature"][1]["layer_0"]["attn"]["temperature"][0, :, 0, 0],
                                np.float32([1, 1, 0.5, 1]))


def test_silence_non_label(out):
  scores = attn(out["none"][1], 1, "scores")
  p = attn(out["silence"][1], 1)
  for h in (0, 3):
    ref = scores[:, h, -1].astype(np.float64).copy()
    ref[:, 0::2] = -np.inf
    np.testing.assert_allclose(p[:, h, -1], softmax(ref), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(p[:, :, :-1], attn(out["none"][1], 1)[:, :, :-1])


def copy_reference(scores, labels):
  """[B, C] scores, [B, C] labels → [B, L] via per-label log-sum-exp (float64)."""
  want = np.full((B, SPEC.num_outputs), -np.inf)
  for b in range(B):
    for y in set(labels[b].tolist()):
      want[b, y] = np.logaddexp.reduce(scores[b][labels[b] == y].astype(np.float64))
  return want


def test_copy_from_head(out):
  logits, acts = out["copy"]
  s = attn(acts, 1, "scores")[:, 1, -1, 1::2]
  want = copy_reference(s, BATCH.labels[:, :-1])
  np.testing.assert_allclose(logits[:, -1], want, rtol=1e-6)
  distinct = BATCH.labels[:, 0] != BATCH.labels[:, 1]
  for b in np.flatnonzero(distinct):  # one token per label: the score itself, bitwise
    np.testing.assert_array_equal(logits[b, -1, BATCH.labels[b, :-1]], s[b])
  np.testing.assert_array_equal(logits[:, :-1], out["none"][0][:, :-1])
  np.testing.assert_array_equal(acts["logits"], logits)


def test_preserve_with_nothing_changed_is_bitwise(out):
  for a, b in zip(jax.tree.leaves(out["preserve_all"]), jax.tree.leaves(out["none"])):
    np.testing.assert_array_equal(a, b)


def test_pattern_and_value_preserving_ablations(out):
  # Layer 0 ablated; layer 1 keeps the unablated pass's patterns (or values).
  acts_p, acts_v, ref = out["preserve_pattern_ablate"][1], out["preserve_value_ablate"][1], out["none"][1]
  np.testing.assert_array_equal(attn(acts_p, 1), attn(ref, 1))
  np.testing.assert_array_equal(attn(acts_v, 1, "v"), attn(ref, 1, "v"))
  assert np.all(attn(acts_p, 0, "v") == 0)
  assert np.all(attn(acts_v, 0, "v") == 0)
  assert not np.array_equal(attn(acts_v, 1), attn(ref, 1))  # patterns do change there
  # Independent: layer 0 removed, layer-1 patterns from the intact model.
  np.testing.assert_array_equal(acts_p["layer_0"]["resid_post"], acts_p["embed"])
  # A preserved entry yields to any other clamp: the disallowed entries win.
  p = attn(out["preserve_yields"][1], 0)
  np.testing.assert_array_equal(p[:, 0], attn(out["disallow"][1], 0)[:, 0])


def layer_norm(x, scale, bias):
  x = x.astype(np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * scale + bias


def rope(x):  # [B, T, H, dh]
  dh = x.shape[-1]
  ang = np.arange(x.shape[1])[:, None] * SPEC.rope_base ** (-np.arange(0, dh, 2) / dh)
  cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  out = np.empty_like(x)
  out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
  out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
  return out


def layer_scores(resid, p):
  """Numpy scores of a pre-LN RoPE attention layer, [B, H, T, T]."""
  x = layer_norm(resid, p["ln"]["scale"], p["ln"]["bias"])
  q = rope(np.einsum("btd,dhe->bthe", x, p["attn"]["w_q"]))
  k = rope(np.einsum("btd,dhe->bthe", x, p["attn"]["w_k"]))
  s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(SPEC.d_head)
  return np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)


def test_layer1_clamp(out):
  acts = out["layer1"][1]
  emb = np.asarray(acts["embed"])
  np.testing.assert_array_equal(acts["layer_0"]["resid_post"], emb)
  # Each position but the first and the query holds the previous token's embedding.
  shifted = emb.copy()
  shifted[:, 1:-1] = emb[:, :-2]
  want = layer_scores(shifted, PARAMS["layer_1"])
  np.testing.assert_allclose(attn(acts, 1, "scores"), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(attn(acts, 1), softmax(want), rtol=1e-4, atol=1e-6)
  # layer1 + copy: the logits are the (clamped) layer-1 scores of head 2.
  logits, acts2 = out["layer1_copy"]
  s = attn(acts2, 1, "scores")[:, 2, -1, 1::2]
  np.testing.assert_array_equal(s, attn(acts, 1, "scores")[:, 2, -1, 1::2])
  np.testing.assert_allclose(logits[:, -1], copy_reference(s, BATCH.labels[:, :-1]), rtol=1e-6)


def hybrid(lower, upper, layer):
  """Parameters with embeddings and layers <= layer from `lower`, the rest from `upper`."""
  out = dict(upper)
  out["embed_x"], out["embed_y"] = lower["embed_x"], lower["embed_y"]
  for l in range(layer + 1):
    out[f"layer_{l}"] = lower[f"layer_{l}"]
  return out


def test_grafts_equal_hybrid_models(out):
  # The hybrid model is another XLA program (unbatched): float32 rounding only.
  ref_in = jax.device_get(PLAIN(hybrid(DONOR, PARAMS, 0)))
  ref_out = jax.device_get(PLAIN(hybrid(PARAMS, DONOR, 0)))
  close = dict(rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(out["graft_in"][0], ref_in[0], **close)
  np.testing.assert_allclose(out["graft_in"][1]["layer_0"]["resid_post"],
                             ref_in[1]["layer_0"]["resid_post"], **close)
  np.testing.assert_allclose(out["graft_out"][0], ref_out[0], **close)
  np.testing.assert_allclose(attn(out["graft_out"][1], 1), attn(ref_out[1], 1), **close)


# --------------------------------------------------------------------------
# Gradients: none through clamped entries, unclamped parameters still train.


def attn_grads(g, layer, name, heads):
  w = np.asarray(g[f"layer_{layer}"]["attn"][name])
  return w[heads] if name == "w_o" else w[:, heads]


def test_gradients(grads):
  g = grads
  # Ablated heads get no gradient at all; the kept heads do.
  for case in ("ablate_v", "ablate_z"):
    for w in ("w_q", "w_k", "w_v", "w_o"):
      assert zero(attn_grads(g[case], 1, w, [0, 2])), (case, w)
      assert not zero(attn_grads(g[case], 1, w, [1, 3])), (case, w)
  # A fixed pattern: no gradient to that head's queries and keys; its values train.
  for case, layer, heads in (("prev_token", 0, [1]), ("induction", 1, [2]), ("match", 1, [1, 3])):
    assert zero(attn_grads(g[case], layer, "w_q", heads)), case
    assert zero(attn_grads(g[case], layer, "w_k", heads)), case
    assert not zero(attn_grads(g[case], layer, "w_v", heads)), case
    assert not zero(g[case]["embed_x"])
  # Perfect copy: only the copying head's QK path in the last layer learns.
  assert zero(g["copy"]["unembed"])
  assert zero([attn_grads(g["copy"], 1, w, list(range(H))) for w in ("w_v", "w_o")])
  assert zero(attn_grads(g["copy"], 1, "w_q", [0, 2, 3]))
  assert not zero(attn_grads(g["copy"], 1, "w_q", [1]))
  assert not zero(g["copy"]["layer_0"])
  # Layer-1 clamp: the first layer's attention gets nothing, the second learns.
  assert zero(g["layer1"]["layer_0"])
  for w in ("w_q", "w_k", "w_v", "w_o"):
    assert not zero(attn_grads(g["layer1"], 1, w, [0])), w
  assert zero(g["layer1_copy"]["layer_0"])
  assert zero(attn_grads(g["layer1_copy"], 1, "w_v", [2]))
  assert not zero(attn_grads(g["layer1_copy"], 1, "w_q", [2]))
  # Grafts: the replaced layers get nothing.
  assert zero(g["graft_in"]["layer_0"]) and zero(g["graft_in"]["embed_x"])
  assert zero(g["graft_out"]["layer_1"]) and zero(g["graft_out"]["unembed"])
  assert not zero(g["graft_out"]["layer_0"])
  # Temperature is not an assignment: the head still learns.
  assert not zero(attn_grads(g["temperature"], 0, "w_q", [2]))


# --------------------------------------------------------------------------
# Composition and conflicts.


def test_conflicting_clamps_are_errors():
  with pytest.raises(ConfigError, match="prev_token.*disallow_prev_token.*both clamp"):
    C.build(SPEC, [[C.PrevTokenPattern(layer=0, heads=(0,)), C.DisallowPrevToken(layer=0, heads=(0,))]])
  with pytest.raises(ConfigError, match="values of layer 1 head 2"):
    C.build(SPEC, [[C.AblateHeads(layer=1, heads=(2,)), C.AblateHeads(layer=-1, heads=(1, 2), site="z")]])
  with pytest.raises(ConfigError, match="logits"):
    C.build(SPEC, [[C.CopyFromHead(head=0), C.GraftOut(layer=0, params=DONOR)]])
  with pytest.raises(ConfigError, match="attention of layer 1"):
    C.build(SPEC, [[C.Layer1Clamp(), C.SilenceNonLabel(heads=(1,))]])
  # Disjoint entries of one kind compose; different runs never conflict.
  C.build(SPEC, [[C.PrevTokenPattern(layer=0, heads=(0,)), C.DisallowPrevToken(layer=0, heads=(1,)),
                  C.PrevTokenPattern(layer=0, heads=(2,), strength=0.5)],
                 [C.DisallowPrevToken(layer=0, heads=(0,))]])
  assert C.conflicts({"a": C.Clamp(0.0, np.array([True, False]))},
                     {"a": C.Clamp(1.0, np.array([True, True]))}) == ["a"]


def test_invalid_clamps_name_the_field():
  with pytest.raises(ConfigError, match="head 4 out of range"):
    C.build(SPEC, [[C.AblateHeads(layer=1, heads=(4,))]])
  with pytest.raises(ConfigError, match="layer 2 out of range"):
    C.fixed_plan(SPEC, [C.InductionPattern(layer=2)], "clamps")
  one_layer = dataclasses.replace(SPEC, num_layers=1)
  with pytest.raises(ConfigError, match="at least 2 layers") as e:
    C.build(one_layer, [[C.Layer1Clamp()]])
  assert e.value.field == "clamps"
  with pytest.raises(ValueError, match="strength must be in"):
    C.PrevTokenPattern(layer=0, strength=1.5)
  with pytest.raises(ConfigError, match="temperature must be > 0"):
    C.build(SPEC, [[C.HeadTemperature(layer=0, temperature=0.0)]])
  with pytest.raises(ConfigError, match="do not fit"):
    C.build(SPEC, [[C.GraftIn(layer=0, params={"embed_x": {}})]])


# --------------------------------------------------------------------------
# Config forms.


def test_parse_and_render_round_trip():
  text = ("ablate(layer=1, heads=[0, 2]) + prev_token(layer=0, heads=[1], strength=0.9, "
          "only_labels=true) + induction(layer=-1, heads=[3], strength=0.75) + "
          "disallow_prev_token(layer=0, heads=[2]) + match(layer=1, heads=[1], temperature=0.1) + "
          "temperature(layer=0, heads=[0], temperature=2.0) + silence_non_label(heads=[0]) + "
          "copy(head=3) + preserve(what=[pattern, v]) + layer1() + graft_in(layer=0, workdir='runs/a', "
          "run=2, step=64000)")
  clamps = C.parse(text)
  assert [type(c) for c in clamps] == [
      C.AblateHeads, C.PrevTokenPattern, C.InductionPattern, C.DisallowPrevToken, C.MatchPattern,
      C.HeadTemperature, C.SilenceNonLabel, C.CopyFromHead, C.Preserve, C.Layer1Clamp, C.GraftIn]
  assert clamps[1] == C.PrevTokenPattern(layer=0, heads=(1,), strength=0.9, only_labels=True)
  assert clamps[8].what == ("pattern", "v")
  assert C.render(clamps) == text
  assert C.parse(C.render(clamps[:10])) == clamps[:10]
  assert C.parse("ablate(layer=0, heads=2)") == (C.AblateHeads(layer=0, heads=(2,)),)


@pytest.mark.parametrize("text, message", [
    ("1:3", "cannot parse"),
    ("ablate(1, [0])", "keyword arguments"),
    ("ablate(layer=1, heads='1:3')", "list of integers"),
    ("ablate(layer=1, head=[0])", "unknown argument 'head'"),
    ("ablte(layer=1)", "unknown clamp 'ablte'"),
    ("prev_token(heads=[0])", r"missing argument\(s\) \['layer'\]"),
    ("prev_token(layer=0, strength=2)", r"strength must be in \[0, 1\]"),
    ("ablate(layer=1) * copy(head=0)", "not a clamp call"),
])
def test_parse_errors(text, message):
  with pytest.raises(ConfigError, match=message) as e:
    C.parse(text)
  assert e.value.field == "clamps"


def with_fields(**fields):
  c = tiny_config()
  for f, v in fields.items():
    config_lib.set_field(c, f.replace("__", "."), v)
  return c


@pytest.mark.parametrize("fields, field, message", [
    ({"clamp__keep_head": 4}, "clamp.keep_head", "last-layer head in"),
    ({"clamp__condition": "matchy"}, "clamp.condition", "must be one of"),
    ({"clamp__condition": "prev_token", "clamp__strength": 1.5}, "clamp.strength", "in \\[0, 1\\]"),
    ({"clamp__condition": "copy"}, "clamp.condition", "clamp.keep_head >= 0"),
    ({"clamp__condition": "layer1", "model__num_layers": 3}, "clamp.condition", "2-layer"),
    ({"clamps": "ablate(layer=1:3)"}, "clamps", "cannot parse"),
    ({"clamps": "induction(layer=1, heads=[2])", "clamp__keep_head": 2, "clamp__condition": "match"},
     "clamp.condition", "both clamp"),
    ({"clamps": "graft_in(layer=0, workdir='/nonexistent')"}, "clamps", "no icldyn workdir"),
    ({"eval__clamps": "keep_head_9"}, "eval.clamps", "head 9 out of range"),
    ({"eval__clamps": "ablate_everything"}, "eval.clamps", "unknown named clamp"),
])
def test_config_validation(fields, field, message):
  with pytest.raises(ConfigError, match=message) as e:
    build.validate(with_fields(**fields))
  assert e.value.field == field


def test_describe():
  assert C.describe({"clamp.keep_head": -1, "clamp.condition": "none"}) == {"clamps": "none"}
  assert C.describe({"clamp.keep_head": 3, "clamp.condition": "match", "clamp.strength": 1.0}) == {
      "clamps": "keep_head(3)+condition(match,s=1.0)"}
  assert C.describe({"clamp.keep_head": 0, "clamp.condition": "layer1_copy", "clamp.strength": 0.5,
                     "clamps": "ablate(layer=0,heads=[1])"}) == {
      "clamps": "keep_head(0)+condition(layer1_copy)+ablate(layer=0, heads=[1])"}


def test_named_plans():
  assert C.named_clamps("keep_head_2", SPEC) == (C.AblateHeads(layer=1, heads=(0, 1, 3)),)
  assert C.named_clamps("ablate_head_0_3", SPEC) == (C.AblateHeads(layer=0, heads=(3,)),)
  assert C.named_clamps("ablate_layer_1", SPEC) == (C.AblateHeads(layer=1),)
  assert C.named_clamps("preserve_pattern_ablate_v_0", SPEC) == (
      C.Preserve(what=("pattern",)), C.AblateHeads(layer=0))
  assert C.named_plan("unclamped", SPEC) == C.Plan((), ())
  # A plan is static: equal plans built twice hash equally (they key one
  # compiled program), and a different clamp gives a different plan.
  a, b = C.named_plan("keep_head_2", SPEC), C.named_plan("keep_head_2", SPEC)
  assert a is not b and a == b and hash(a) == hash(b)
  assert C.named_plan("keep_head_1", SPEC) != a
  with pytest.raises(ConfigError, match="did you mean keep_head_2\\?$") as e:
    C.named_plan("keep_heads_2", SPEC)
  assert e.value.field == "eval.clamps"
  with pytest.raises(ConfigError, match="ablate_layer_N"):  # nothing close: the catalogue
    C.named_plan("everything", SPEC)
  with pytest.raises(ConfigError, match="layer 2 out of range"):
    C.named_plan("ablate_layer_2", SPEC)


def test_named_plan_equals_training_clamp(out):
  # A fixed plan computes what the same clamps do as per-run data.
  plan = C.named_plan("preserve_pattern_ablate_v_0", SPEC)
  logits, _ = jax.jit(lambda p: plan.forward(SPEC, p, BATCH, SPEC.num_outputs, None))(PARAMS)
  np.testing.assert_allclose(logits, out["preserve_pattern_ablate"][0], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Grids.


def test_conditions_share_one_program_and_positions_are_bitwise():
  settings = [{"clamp.keep_head": k, "clamp.condition": c, "clamp.strength": s}
              for k, c, s in ((-1, "none", 1.0), (1, "prev_token", 0.7), (1, "layer1", 1.0),
                              (2, "match", 0.9), (3, "copy", 1.0), (0, "layer1_copy", 1.0))]
  plan, params, evals = C.plans_for_group(CFG, settings, SPEC)
  assert evals == ()
  # Any subset of the conditions with the same sites gives the same (static) plan.
  plan2, _, _ = C.plans_for_group(CFG, settings[::-1], SPEC)
  assert plan2 == plan and hash(plan2) == hash(plan)
  assert (C.plans_for_group(CFG, [{"clamp.keep_head": 3}], SPEC)[0]
          == C.plans_for_group(CFG, [{"clamp.keep_head": 1}], SPEC)[0])
  fwd = jax.jit(jax.vmap(lambda cp: plan.forward(SPEC, PARAMS, BATCH, SPEC.num_outputs, cp)))
  logits, acts = jax.device_get(fwd(params))
  perm = [3, 0, 5, 1, 4, 2]
  logits_p, acts_p = jax.device_get(fwd(jax.tree.map(lambda x: x[perm], params)))
  assert fwd._cache_size() == 1
  np.testing.assert_array_equal(logits_p, logits[perm])
  for a, b in zip(jax.tree.leaves(acts_p), jax.tree.leaves(acts)):
    np.testing.assert_array_equal(a, b[perm])
  # Each run carries its own condition.
  p0 = acts["layer_0"]["attn"]["pattern"]
  np.testing.assert_array_equal(p0[1, :, 0], np.broadcast_to(prev_token_matrix(0.7), (B, T, T)))
  assert not np.array_equal(p0[0, :, 0], p0[1, :, 0])
  assert np.all(acts["layer_1"]["attn"]["v"][1][:, :, [0, 2, 3]] == 0)  # keep_head 1
  np.testing.assert_array_equal(acts["layer_0"]["resid_post"][2], acts["embed"][2])  # layer1
  assert np.all(acts["layer_1"]["attn"]["pattern"][3][:, 2, -1, 0::2] == 0)  # match
  s = acts["layer_1"]["attn"]["scores"][4][:, 3, -1, 1::2]  # copy from head 3
  np.testing.assert_allclose(logits[4][:, -1], copy_reference(s, BATCH.labels[:, :-1]), rtol=1e-6)


@pytest.fixture(scope="module")
def keep_head_grid(tmp_path_factory):
  """The paper's 'train with only one layer-2 head', 8 heads, trained by icldyn."""
  cfg = tiny_config(num_heads=8)
  with cfg.unlocked():
    cfg.eval.clamps = "keep_head_0,unclamped"
  axes = ["clamp.keep_head=0,1,2,3,4,5,6,7"]
  workdir = str(tmp_path_factory.mktemp("keep_head"))
  runner.train(cfg, workdir, axes=axes, quiet=True)
  return cfg, axes, workdir


def test_keep_head_grid_compiles_once_and_equals_runs_alone(keep_head_grid):
  cfg, axes, workdir = keep_head_grid
  prepared = build.prepare(cfg, axes)
  assert len(prepared.groups) == 1  # one group: one compiled program for the 8 runs
  pg = prepared.groups[0]
  assert pg.static.plan == C.plans_for_group(cfg, [{"clamp.keep_head": 5}],
                                             build.model_spec(cfg))[0]
  store = ckpt_lib.Store(workdir, 0, read_only=True)
  final = store.restore_params(store.stream_steps()[-1])
  store.close()
  # Each run alone: a one-run program, compiled once and run with each run's arrays.
  mesh = sharding_lib.run_mesh()
  init, chunk, _ = train_lib.make_programs(pg.static, mesh)
  one = lambda i: jax.tree.map(lambda x: x[i:i + 1], pg.props)
  init = init.lower(one(0)).compile({"xla_backend_optimization_level": 0})  # runs once: compile fast
  steps = cfg.train.num_sequences // cfg.train.batch_size
  for i in range(8):
    props = one(i)
    start = jax.device_get(init(props).params)
    state, _ = chunk(init(props), props, pg.table, 0, steps)  # (donates its state)
    alone = jax.device_get(state.params)
    # XLA on CPU may round differently in a vmap over 1 run than over 8 (here
    # 1 ulp of the largest parameter, ~1.2e-7 of it, already at
    # initialisation); 1e-6 of the parameters' scale is well below any effect
    # of a clamp, which changes whole heads by O(lr) per step.
    scale = max(np.max(np.abs(g[i])) for g in jax.tree.leaves(final))
    for a, g in zip(jax.tree.leaves(alone), jax.tree.leaves(final)):
      assert np.max(np.abs(a[0] - g[i])) <= 1e-6 * scale
    # Only the kept head of layer 2 trains its values.
    moved = np.any(alone["layer_1"]["attn"]["w_v"][0] != start["layer_1"]["attn"]["w_v"][0], axis=(0, 2))
    assert list(np.flatnonzero(moved)) == [i]
  assert chunk._cache_size() == 1


def test_keep_head_grid_records_clamps_and_evaluates_named_clamps(keep_head_grid):
  cfg, axes, workdir = keep_head_grid
  with open(os.path.join(workdir, "runs.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["clamps"] for r in rows] == [f"keep_head({h})" for h in range(8)]
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    evaluators = {r["evaluator"] for r in csv.DictReader(f)}
  assert {"fsl_train", "fsl_train@keep_head_0", "fsl_train@unclamped"} <= evaluators
  # A checkpoint of this grid as a graft donor.
  spec, params = build.load_donor(workdir, 3)
  assert spec == dataclasses.replace(SPEC, num_heads=8)
  store = ckpt_lib.Store(workdir, 0, read_only=True)
  final = store.restore_params(store.stream_steps()[-1])
  store.close()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b[3])
  (resolved,) = C.resolve(spec, [C.GraftIn(layer=0, workdir=workdir, run=3)],
                          load_donor=build.load_donor)
  assert len(jax.tree.leaves(resolved.params)) == len(jax.tree.leaves(params)) > 0
  for a, b in zip(jax.tree.leaves(resolved.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ConfigError, match="differs from this model's in \\['num_heads'\\]"):
    C.resolve(SPEC, [C.GraftOut(layer=0, workdir=workdir, run=3)], load_donor=build.load_donor)
