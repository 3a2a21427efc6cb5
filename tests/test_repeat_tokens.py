"""The token task (`task.name=repeat_tokens`): sampler statistics, reference
targets and head scores, the forward pass, metrics, clamps, one-program grids
and training end to end.

References are numpy loops over the documented definitions
(icldyn/tasks/repeat_tokens.py, icldyn/tasks/scores.py, model/core.py), never
the code under test. Statistical bounds are 5 binomial standard errors, or a
chi-square quantile at p = 1e-6, so that a correct sampler fails them with
probability ~1e-6 whatever its random stream, while the errors they guard
against (a wrong distribution, a wrong placement) move them by far more.
"""

import csv
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from icldyn import build
from icldyn import clamps as C
from icldyn import config as config_lib
from icldyn import group as group_lib
from icldyn import model as model_lib
from icldyn import runner
from icldyn import step as train_lib
from icldyn.errors import ConfigError
from icldyn.store import checkpoints as ckpt_lib
from icldyn.tasks import repeat_tokens as rt
from icldyn.tasks import scores


N = 4000  # sequences per statistical test


def run_settings(vocab=10, segment=3, repeat_prob=0.5, zipf=0.0):
  return {"tokens.vocab_size": vocab, "tokens.segment_len": segment,
          "tokens.repeat_prob": repeat_prob, "tokens.zipf_alpha": zipf}


@functools.lru_cache(maxsize=None)
def sampler(seq_len, num_repeats, placement, capacity, stream):
  """A jitted sampler of N sequences, props as arguments (one compile per shape)."""
  spec = rt.TokenSpec(seq_len=seq_len, num_repeats=num_repeats, placement=placement)
  if stream == "train":
    return jax.jit(lambda key, props: rt.sample_batch(key, props, spec, N))
  task = rt.RepeatTokensSpec(front=rt.TokenFront(seq_len, capacity), train_seq=spec,
                             evaluators=rt.EVALUATORS)
  return jax.jit(lambda key, props: task.sample(key, {}, props, stream, N))


def sample(run, seq_len=16, num_repeats=1, placement="random", capacity=None, seed=0,
           stream="train"):
  """N sequences of one run (host arrays); other streams sample through the task spec."""
  capacity = capacity or run["tokens.vocab_size"]
  props = jax.tree.map(jnp.asarray, rt.make_props(run, capacity))
  f = sampler(seq_len, num_repeats, placement, capacity, stream)
  return jax.tree.map(np.asarray, f(jax.random.PRNGKey(seed), props))


def chi2_bound(dof):
  """The chi-square statistic a correct distribution exceeds with probability 1e-6."""
  return stats.chi2.isf(1e-6, dof)


# --------------------------------------------------------------------------
# 1. The sampler.


def copies_of(tokens, repeated, length, k):
  """Decodes one sequence's copies from its `repeated` mask and checks them.

  The copies' positions are the positions p and p + 1 of every marked p; they
  must form k contiguous, non-overlapping blocks of `length` tokens, the mask
  must mark exactly the p with p and p + 1 in the same copy, every block must hold
  the same tokens (the mask joins p and p + 1 only within one copy), and an earlier window of `length` tokens after BOS that
  ends before the first copy must hold them too (the original). With a large
  vocabulary, an earlier window that matches by chance has probability
  ~1/V^length, so a copy that overwrote its original (overlap) or a mask off
  by a position fails this.

  Returns:
    (copy starts, the earlier windows that match), sequence coordinates.
  """
  marked = np.flatnonzero(repeated)
  in_copy = np.zeros(len(tokens), bool)
  in_copy[marked] = in_copy[marked + 1] = True
  pos = np.flatnonzero(in_copy)
  assert len(pos) == k * length, (tokens, repeated)
  blocks = pos.reshape(k, length)
  assert np.all(blocks[:, -1] - blocks[:, 0] == length - 1), blocks  # contiguous
  block_of = np.full(len(tokens), -1)
  for i, b in enumerate(blocks):
    block_of[b] = i
  same_copy = (block_of[:-1] >= 0) & (block_of[:-1] == block_of[1:])
  assert np.array_equal(repeated[:-1], same_copy) and not repeated[-1], repeated
  seg = tokens[blocks[0]]
  assert np.all(tokens[blocks] == seg), (tokens, blocks)
  first = blocks[0, 0]
  windows = np.lib.stride_tricks.sliding_window_view(tokens[1:first], length)  # starts 1..
  originals = list(1 + np.flatnonzero(np.all(windows == seg, axis=-1)))
  assert originals, (tokens, repeated)
  return blocks[:, 0], originals


def test_bos_share_and_copies_random_placement():
  # V = 1000 so that an earlier window matches a copy by chance with
  # probability ~1e-8 per sequence (see copies_of); T = 16, L = 3, one copy.
  t, length = 16, 3
  b = sample(run_settings(vocab=1000, segment=length, repeat_prob=0.5), seq_len=t)
  assert np.all(b.tokens[:, 0] == rt.BOS)
  assert b.tokens[:, 1:].min() >= 1 and b.tokens[:, 1:].max() <= 1000
  has = b.repeated.any(axis=1)
  # Binomial(4000, 1/2): standard error 0.0079; 5 sigma.
  assert abs(has.mean() - 0.5) < 5 * math.sqrt(0.25 / N)
  free = (t - 1) - 2 * length  # the offsets lie in [0, free]
  copy_off, orig_off = [], []
  for i in np.flatnonzero(has):
    (start,), originals = copies_of(b.tokens[i], b.repeated[i], length, 1)
    copy_off.append(start - 1 - length)  # the larger of the two offsets
    if len(originals) == 1:  # a second matching window (chance, ~1e-8): left out
      orig_off.append(originals[0] - 1)  # the smaller one
  copy_off, orig_off = np.array(copy_off), np.array(orig_off)
  assert len(orig_off) > 0.99 * len(copy_off)
  # Two i.i.d. uniform offsets on {0..F}, sorted: P(max = m) = (2m + 1) / (F + 1)^2,
  # P(min = m) = (2 (F - m) + 1) / (F + 1)^2.
  m = np.arange(free + 1)
  for off, p in ((copy_off, (2 * m + 1) / (free + 1) ** 2),
                 (orig_off, (2 * (free - m) + 1) / (free + 1) ** 2)):
    assert off.min() == 0 and off.max() == free
    counts = np.bincount(off, minlength=free + 1)
    expected = len(off) * p  # >= 19 per cell: the chi-square approximation holds
    assert np.sum((counts - expected) ** 2 / expected) < chi2_bound(free), (counts, expected)


def test_adjacent_placement_starts_right_after_the_original():
  t, length = 16, 3
  b = sample(run_settings(vocab=1000, segment=length, repeat_prob=1.0), seq_len=t,
             placement="adjacent")
  assert np.all(b.repeated.any(axis=1))
  offsets = []
  for i in range(N):
    (start,), originals = copies_of(b.tokens[i], b.repeated[i], length, 1)
    assert start - length in originals
    offsets.append(start - length - 1)  # the original's offset, uniform on {0..F}
  free = (t - 1) - 2 * length
  counts = np.bincount(offsets)
  assert len(counts) == free + 1
  expected = N / (free + 1)
  assert np.sum((counts - expected) ** 2 / expected) < chi2_bound(free), counts


@pytest.mark.parametrize("placement", ["random", "adjacent"])
def test_two_copies(placement):
  # Two copies: non-overlapping blocks holding the segment after an original
  # (copies_of); adjacent ones follow the original one after another.
  length = 3
  b = sample(run_settings(vocab=1000, segment=length, repeat_prob=1.0), num_repeats=2,
             placement=placement)
  touching = 0
  for i in range(N):
    starts, originals = copies_of(b.tokens[i], b.repeated[i], length, 2)
    if placement == "adjacent":
      assert starts[0] - length in originals and starts[1] == starts[0] + length
    touching += starts[1] == starts[0] + length
  if placement == "random":
    # Random copies touch when their sorted offsets tie, which happens often
    # (offsets in {0..6}); they must be drawn, not always spread apart.
    assert 0 < touching < N


@pytest.mark.parametrize("num_repeats, placement", [
    (1, "random"), (2, "adjacent"),
    (2, "random")])
def test_repeated_tokens_are_predictable_by_induction(num_repeats, placement):
  # TokenBatch.repeated: "read-out positions whose prediction a perfect
  # induction head gets right". A perfect induction head at p predicts the
  # tokens that followed earlier occurrences of tokens[p]; the right one must
  # be among them.
  b = sample(run_settings(vocab=1000, segment=3, repeat_prob=1.0), num_repeats=num_repeats,
             placement=placement)
  bad = []
  for i in range(N):
    x = b.tokens[i]
    for p in np.flatnonzero(b.repeated[i]):
      if not any(x[j] == x[p] and x[j + 1] == x[p + 1] for j in range(p)):
        bad.append((i, int(p)))
  assert not bad, f"{len(bad)} unpredictable marked positions, e.g. {bad[0]}: {b.tokens[bad[0][0]]}"


def test_tok_repeat_stream_always_repeats():
  run = run_settings(vocab=1000, repeat_prob=0.0)
  assert not sample(run).repeated.any()
  every = sample(run, stream="tok_repeat")
  for i in range(N):
    copies_of(every.tokens[i], every.repeated[i], 3, 1)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_token_frequencies(alpha):
  # No repeats: all N x 15 tokens are i.i.d.
  v = 10
  b = sample(run_settings(vocab=v, repeat_prob=0.0, zipf=alpha))
  assert not b.repeated.any()
  draws = b.tokens[:, 1:].ravel()
  assert draws.min() >= 1 and draws.max() <= v
  counts = np.bincount(draws, minlength=v + 1)[1:]
  p = np.arange(1, v + 1, dtype=np.float64) ** -alpha  # p(k) ~ k^-alpha, k = 1..V
  p /= p.sum()
  total = draws.size
  # Each count ~ Binomial(60000, p_k): 5 sigma per token; and the chi-square.
  sigma = np.sqrt(total * p * (1 - p))
  assert np.all(np.abs(counts - total * p) < 5 * sigma), (counts, total * p)
  assert np.sum((counts - total * p) ** 2 / (total * p)) < chi2_bound(v - 1)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_padding_does_not_change_a_runs_tokens(alpha):
  run = run_settings(vocab=10, segment=3, repeat_prob=0.5, zipf=alpha)
  small = sample(run, capacity=10)
  big = sample(run, capacity=25)
  np.testing.assert_array_equal(small.tokens, big.tokens)
  np.testing.assert_array_equal(small.repeated, big.repeated)
  assert big.tokens.max() <= 10


# --------------------------------------------------------------------------
# 2. Reference targets and head scores on hand-built sequences.

TOKENS = np.array([
    [0, 1, 2, 3, 1, 2, 3, 4, 5, 1, 2, 6],  # a segment repeated, then partly again
    [0, 5, 5, 5, 2, 5, 2, 1, 3, 4, 6, 1],  # doubled tokens, several targets per row
    [0, 1, 2, 3, 4, 5, 6, 6, 2, 1, 4, 3],  # one doubled token, repeats out of order
    [0, 4, 3, 4, 3, 4, 3, 4, 3, 4, 3, 4],  # alternation: many targets
], np.int32)
NB, NT = TOKENS.shape


def reference_induction(tokens):
  """[B, T, T]: key j is a target of row p iff j - 1 < p and tokens[j-1] == tokens[p] (loop)."""
  b, t = tokens.shape
  out = np.zeros((b, t, t), bool)
  for s in range(b):
    for p in range(t):
      for j in range(1, p + 1):
        out[s, p, j] = tokens[s, j - 1] == tokens[s, p]
  return out


def batch_of(tokens):
  return rt.TokenBatch(tokens=jnp.asarray(tokens), repeated=jnp.zeros(tokens.shape, bool))


def test_targets_against_a_loop():
  tg = jax.tree.map(np.asarray, rt.TokenFront(seq_len=NT, vocab_size=6).targets(batch_of(TOKENS)))
  ind = reference_induction(TOKENS)
  np.testing.assert_array_equal(tg.induction, ind)
  assert not tg.contrast.any()
  np.testing.assert_array_equal(tg.support, np.broadcast_to(np.tril(np.ones((NT, NT), bool)),
                                                            (NB, NT, NT)))
  # Rows: positions whose token occurred earlier in the sequence.
  rows = np.array([[TOKENS[s, p] in TOKENS[s, :p] for p in range(NT)] for s in range(NB)])
  np.testing.assert_array_equal(tg.rows, rows)
  np.testing.assert_array_equal(tg.match_sim, ind.astype(np.float32))
  want_out = TOKENS.copy()
  want_out[:, 0] = -1
  np.testing.assert_array_equal(tg.key_outputs, want_out)
  # Spot checks written out by hand: row 4 of sequence 0 (token 1, seen at 1)
  # targets key 2; row 5 of sequence 1 (token 5, seen at 1, 2, 3) keys 2, 3, 4.
  assert list(np.flatnonzero(ind[0, 4])) == [2]
  assert list(np.flatnonzero(ind[1, 5])) == [2, 3, 4]
  assert list(np.flatnonzero(ind[1, 2])) == [2]  # the doubled token targets itself


def test_head_scores_on_hand_built_patterns():
  ind = reference_induction(TOKENS)
  rows = ind.any(-1)
  n = ind.sum(-1)
  causal = np.tril(np.ones((NT, NT)))
  perfect = np.where(rows[..., None], ind / np.maximum(n, 1)[..., None], np.eye(NT))
  uniform = np.broadcast_to(causal / causal.sum(-1, keepdims=True), (NB, NT, NT))
  prev = np.broadcast_to(np.eye(NT, k=-1) + np.eye(NT) * (np.arange(NT) == 0), (NB, NT, NT))
  pattern = np.stack([perfect, uniform, prev], 1).astype(np.float32)  # [B, 3, T, T]
  front = rt.TokenFront(seq_len=NT, vocab_size=6)
  sums, counts = jax.device_get(scores.induction_rows(jnp.asarray(pattern), front.targets(batch_of(TOKENS))))
  np.testing.assert_array_equal(counts, rows.sum(-1))
  mean = sums.sum(0) / counts.sum()  # every row weighs the same
  # By loop: per row, the attention on its targets; mean over rows with targets.
  want = np.zeros(3)
  for h in range(3):
    vals = [pattern[s, h, p][ind[s, p]].astype(np.float64).sum()
            for s in range(NB) for p in range(NT) if rows[s, p]]
    want[h] = np.mean(vals)
  assert want[0] == pytest.approx(1.0, abs=1e-6)
  # float32 sums of at most 12 terms of size <= 1: relative error < 1e-6.
  np.testing.assert_allclose(mean, want, rtol=1e-6)
  assert mean[0] == pytest.approx(1.0, abs=1e-6)
  assert 0 < mean[1] < 0.5  # uniform: n/(p+1) per row, small
  # Previous-token score: a - (1 - a) / (i + 1) at rows i = 1..T-1 (scores.py).
  prev_score = np.asarray(scores.prev_token(jnp.asarray(pattern), front.layout))
  i = np.arange(1, NT)
  for h in range(3):
    a = pattern[:, h, i, i - 1].astype(np.float64)
    np.testing.assert_allclose(prev_score[:, h], np.mean(a - (1 - a) / (i + 1), -1), rtol=1e-6)
  np.testing.assert_array_equal(prev_score[:, 2], 1.0)


# --------------------------------------------------------------------------
# 3. The forward pass against numpy.


def random_params(spec, seed, scale=0.5):
  shapes = jax.eval_shape(lambda: model_lib.init_params(spec, 0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(np.float32), shapes)


def layer_norm(x, scale, bias):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * scale + bias  # flax LayerNorm epsilon


def rope(x, base):
  """[B, T, H, dh]: pairs (x[2i], x[2i+1]) rotated by pos * base^(-2i/dh)."""
  t, dh = x.shape[1], x.shape[-1]
  out = np.empty_like(x)
  for pos in range(t):
    for i in range(dh // 2):
      a = pos * base ** (-2.0 * i / dh)
      x0, x1 = x[:, pos, :, 2 * i], x[:, pos, :, 2 * i + 1]
      out[:, pos, :, 2 * i] = x0 * math.cos(a) - x1 * math.sin(a)
      out[:, pos, :, 2 * i + 1] = x0 * math.sin(a) + x1 * math.cos(a)
  return out


def softmax(x):
  x = np.asarray(x, np.float64)
  m = np.max(x, -1, keepdims=True)
  e = np.exp(x - m)
  return e / e.sum(-1, keepdims=True)


def numpy_forward(spec, params, tokens, num_outputs):
  """Logits and per-layer patterns of an attention-only pre-LN RoPE model (float64)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  t, dh = tokens.shape[1], spec.d_head
  x = p["embed_tokens"]["embedding"][tokens]
  patterns = []
  for l in range(spec.num_layers):
    lp = p[f"layer_{l}"]
    y = layer_norm(x, lp["ln"]["scale"], lp["ln"]["bias"])
    q = rope(np.einsum("btd,dhe->bthe", y, lp["attn"]["w_q"]), spec.rope_base)
    k = rope(np.einsum("btd,dhe->bthe", y, lp["attn"]["w_k"]), spec.rope_base)
    v = np.einsum("btd,dhe->bthe", y, lp["attn"]["w_v"])
    s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(dh)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    pat = softmax(s)
    patterns.append(pat)
    z = np.einsum("bhqk,bkhe->bqhe", pat, v)
    x = x + np.einsum("bqhe,hed->bqd", z, lp["attn"]["w_o"])
  f = layer_norm(x, p["ln_final"]["scale"], p["ln_final"]["bias"])
  logits = f @ p["unembed"]["kernel"] + p["unembed"]["bias"]
  ids = np.arange(logits.shape[-1])
  return np.where((ids >= 1) & (ids <= num_outputs), logits, -np.inf), patterns


def test_forward_matches_numpy():
  spec = model_lib.ModelSpec(num_layers=2, num_heads=2, d_model=16,
                             front=rt.TokenFront(seq_len=12, vocab_size=8), pos_embedding="rope")
  params = random_params(spec, 3)
  tokens = np.concatenate([np.zeros((3, 1), np.int32),
                           np.random.default_rng(4).integers(1, 7, size=(3, 11))], 1)
  # A run with V = 6 in a capacity of 8: ids 0, 7 and 8 are masked.
  logits, acts = jax.jit(lambda p, b: model_lib.apply(spec, p, b, jnp.int32(6)))(
      params, batch_of(tokens))
  logits = np.asarray(logits)
  want, patterns = numpy_forward(spec, params, tokens, 6)
  assert logits.shape == (3, 12, 9)
  np.testing.assert_array_equal(np.isinf(logits), np.isinf(want))
  assert np.all(np.isneginf(logits[..., [0, 7, 8]])) and np.all(np.isfinite(logits[..., 1:7]))
  # float32 against float64 through two layers, LayerNorms and softmaxes:
  # observed max 5e-7 on logits up to 2.7 (a float32 ulp there is 2.4e-7),
  # 2.6e-7 on patterns; the bounds leave a 20x margin, while a modelling error
  # (scale, rotation, mask, norm) moves them by far more.
  np.testing.assert_allclose(logits[..., 1:7], want[..., 1:7], rtol=1e-5, atol=1e-5)
  for l in range(2):
    np.testing.assert_allclose(acts[f"layer_{l}"]["attn"]["pattern"], patterns[l],
                               rtol=1e-5, atol=5e-6)


def test_vocabulary_padding_behaves_like_a_smaller_vocabulary():
  small = model_lib.ModelSpec(2, 2, 16, rt.TokenFront(seq_len=12, vocab_size=6))
  big = model_lib.ModelSpec(2, 2, 16, rt.TokenFront(seq_len=12, vocab_size=11))
  # Both inits in one program at XLA's lowest optimisation level (as the
  # runner's init program: it runs once, so it compiles fast).
  init = jax.jit(lambda: (model_lib.init_params(small, 0), model_lib.init_params(big, 0)))
  ps, pb = init.lower().compile({"xla_backend_optimization_level": 0})()
  np.testing.assert_array_equal(pb["embed_tokens"]["embedding"][:7], ps["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(pb["unembed"]["kernel"][:, :7], ps["unembed"]["kernel"])
  fwd = lambda spec, p: jax.jit(lambda q: model_lib.apply(spec, q, batch_of(TOKENS), 6)[0])(p)  # noqa: E731
  ls, lb = fwd(small, ps), fwd(big, pb)
  assert np.all(np.isneginf(np.asarray(lb)[..., 7:]))
  # Different output widths are different XLA programs: float32 rounding only.
  np.testing.assert_allclose(lb[..., 1:7], ls[..., 1:7], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# 4. Metrics.


def test_icl_positions():
  # Token k of Olsson et al. (1-based after BOS) is read out at position k - 1:
  # T - 1 = 512 gives tokens 50 and 500; 15 gives round(1.46) = 1 and
  # round(14.65) = 15; 63 gives round(6.15) = 6 and round(61.52) = 62.
  assert rt.icl_positions(513) == (49, 499)
  assert rt.icl_positions(16) == (0, 14)
  assert rt.icl_positions(64) == (5, 61)
  assert rt.icl_positions(4) == (0, 2)  # early token at least 1, late at most T - 1


def reference_metrics(logits, tokens, repeated, early, late):
  x = logits.astype(np.float64)[:, :-1]
  m = x.max(-1, keepdims=True)
  logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
  target = tokens[:, 1:]
  loss = np.zeros(target.shape)
  correct = np.zeros(target.shape)
  for b in range(target.shape[0]):
    for p in range(target.shape[1]):
      loss[b, p] = -logp[b, p, target[b, p]]
      correct[b, p] = np.argmax(x[b, p]) == target[b, p]
  rep = repeated[:, :-1]
  mean = lambda a, w: a[w].mean() if w.any() else np.nan  # noqa: E731
  return {"loss": loss.mean(), "acc": correct.mean(),
          "loss_repeated": mean(loss, rep), "acc_repeated": mean(correct, rep),
          "loss_other": mean(loss, ~rep),
          "icl_score": loss[:, late].mean() - loss[:, early].mean()}


@pytest.mark.parametrize("repeat_prob", [0.5, 0.0])
def test_metrics_against_numpy(repeat_prob):
  b = sample(run_settings(vocab=10, segment=4, repeat_prob=repeat_prob))
  b = jax.tree.map(lambda x: x[:64], b)
  assert b.repeated.any() == (repeat_prob > 0)
  logits = 2.0 * np.random.default_rng(5).normal(size=(64, 16, 11)).astype(np.float32)
  logits[..., 0] = -np.inf  # BOS, masked as the model does
  got = jax.device_get(rt.reduce_sequences(rt.per_sequence(jnp.asarray(logits), b)))
  want = reference_metrics(logits, b.tokens, b.repeated, 0, 14)
  assert set(got) == set(want)
  for k, v in want.items():
    if np.isnan(v):
      assert np.isnan(got[k]), k
    else:
      # float32 sums of ~1000 terms: relative rounding ~1e-6.
      np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------
# 5. Clamps on the token task.

SPEC = model_lib.ModelSpec(num_layers=2, num_heads=4, d_model=16,
                           front=rt.TokenFront(seq_len=NT, vocab_size=6))
PARAMS = random_params(SPEC, 0)
DONOR = random_params(SPEC, 1)
BATCH = batch_of(TOKENS)
NUM_OUT = np.int32(6)
IND = reference_induction(TOKENS)
ROWS = IND.any(-1)

CASES = {
    "none": [],
    "ablate_v": [C.AblateHeads(layer=1, heads=(0, 2))],
    "ablate_z": [C.AblateHeads(layer=1, heads=(0, 2), site="z")],
    "prev_token": [C.PrevTokenPattern(layer=0, heads=(0,), strength=0.8)],
    "induction": [C.InductionPattern(layer=1, heads=(1,), strength=1.0)],
    "induction_weak": [C.InductionPattern(layer=1, heads=(3,), strength=0.6)],
    "match": [C.MatchPattern(layer=1, heads=(1,))],
    "match_soft": [C.MatchPattern(layer=1, heads=(2,), temperature=0.5)],
    "disallow": [C.DisallowPrevToken(layer=0, heads=(1,))],
    "temperature": [C.HeadTemperature(layer=0, heads=(2,), temperature=0.5)],
    "copy": [C.CopyFromHead(head=1)],
    "preserve_all": [C.Preserve(what=C.PRESERVABLE)],
    "preserve_pattern_ablate": [C.Preserve(what=("pattern",)), C.AblateHeads(layer=0)],
    "graft_in": [C.GraftIn(layer=0, params=DONOR)],
    "graft_out": [C.GraftOut(layer=0, params=DONOR)],
}
NAMES = list(CASES)


@pytest.fixture(scope="module")
def plain():
  fn = jax.jit(lambda p: model_lib.apply(SPEC, p, BATCH, NUM_OUT))
  return lambda p: jax.device_get(fn(p))


@pytest.fixture(scope="module")
def out():
  """{case: (logits, acts)} of the catalogue as one grid (one program)."""
  plan, clamp_params = C.build(SPEC, list(CASES.values()))
  fwd = jax.jit(jax.vmap(lambda p, cp: plan.forward(SPEC, p, BATCH, NUM_OUT, cp)))
  per_run = jax.tree.map(lambda x: np.broadcast_to(x, (len(NAMES),) + x.shape), PARAMS)
  logits, acts = jax.device_get(fwd(per_run, clamp_params))
  return {n: jax.tree.map(lambda x: x[i], (logits, acts)) for i, n in enumerate(NAMES)}


def attn(acts, layer, name="pattern"):
  return np.asarray(acts[f"layer_{layer}"]["attn"][name])


def test_unclamped_run_and_ablation(out, plain):
  # The plan's vmapped program and the plain model are different programs:
  # float32 rounding of logits up to ~3 in size differs by a few ulp of the
  # largest terms (measured up to 1.9e-6 at XLA's optimisation level 0).
  np.testing.assert_allclose(out["none"][0], plain(PARAMS)[0], rtol=1e-6, atol=1e-5)
  edited = jax.tree.map(np.copy, PARAMS)
  edited["layer_1"]["attn"]["w_o"][[0, 2]] = 0.0  # independent: remove the heads' output
  ref = plain(edited)[0]
  # Another program (zero w_o, unbatched): float32 rounding of sums of logits
  # up to ~3 in size, i.e. a few ulp (2.4e-7 each) of the largest terms.
  for case in ("ablate_v", "ablate_z"):
    np.testing.assert_allclose(out[case][0], ref, rtol=1e-6, atol=1e-5)
  assert np.all(attn(out["ablate_v"][1], 1, "v")[:, :, [0, 2]] == 0)


def test_prev_token_clamp(out):
  s = np.float32(0.8)
  m = np.zeros((NT, NT), np.float32)
  m[0, 0] = 1
  for i in range(1, NT):
    m[i, i], m[i, i - 1] = np.float32(1) - s, s
  p = attn(out["prev_token"][1], 0)
  np.testing.assert_array_equal(p[:, 0], np.broadcast_to(m, (NB, NT, NT)))
  np.testing.assert_array_equal(p[:, 1:], attn(out["none"][1], 0)[:, 1:])


def test_induction_clamp(out):
  ref = attn(out["none"][1], 1)
  n_c = IND.sum(-1).astype(np.float32)
  support = np.tril(np.ones((NT, NT), bool))
  # Strength 1: weight 1/n on the n targets at rows that have them.
  p = attn(out["induction"][1], 1)
  want = np.where(IND, np.float32(1) / np.maximum(n_c, 1)[..., None], np.float32(0))
  # One float32 division per entry: equal to 2 ulp (2.4e-7 relative).
  np.testing.assert_allclose(p[:, 1][ROWS], want[ROWS], rtol=2.4e-7, atol=0)
  np.testing.assert_array_equal(p[:, 1][~ROWS], ref[:, 1][~ROWS])  # unclamped rows
  np.testing.assert_array_equal(p[:, [0, 2, 3]], ref[:, [0, 2, 3]])
  # Strength 0.6: 0.6 shared by the targets, 0.4 by the other keys up to the row.
  p = attn(out["induction_weak"][1], 1)[:, 3]
  s = np.float32(0.6)
  others = (support & ~IND).sum(-1).astype(np.float32)
  want = np.where(IND, s / np.maximum(n_c, 1)[..., None],
                  np.where(support, (np.float32(1) - s) / others[..., None], np.float32(0)))
  np.testing.assert_allclose(p[ROWS], want[ROWS], rtol=2.4e-7, atol=0)  # as above
  np.testing.assert_array_equal(p[~ROWS], ref[:, 3][~ROWS])
  # The prefix-matching score of the strength-1 head is 1.
  sums, counts = scores.induction_rows(jnp.asarray(attn(out["induction"][1], 1)),
                                       SPEC.front.targets(BATCH))
  assert float(np.sum(sums[:, 1]) / np.sum(counts)) == pytest.approx(1.0, abs=1e-6)


def test_match_clamp(out):
  # Temperature 0 on this task: the same pattern as induction with strength 1.
  # (1/n from a division either way: equal to 2 ulp.)
  np.testing.assert_allclose(attn(out["match"][1], 1), attn(out["induction"][1], 1),
                             rtol=2.4e-7, atol=0)
  # Temperature 0.5: softmax over keys up to the row of sim / 0.5, sim = 1 on targets, 0 else.
  support = np.tril(np.ones((NT, NT), bool))
  sims = np.where(support, IND.astype(np.float64) / 0.5, -np.inf)
  p = attn(out["match_soft"][1], 1)[:, 2]
  # A float32 softmax of 12 terms against float64: a few ulp.
  np.testing.assert_allclose(p[ROWS], softmax(sims)[ROWS], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(p[~ROWS], attn(out["none"][1], 1)[:, 2][~ROWS])


def test_disallow_prev_token_and_temperature(out):
  scores0 = attn(out["none"][1], 0, "scores").astype(np.float64)
  p = attn(out["disallow"][1], 0)
  i = np.arange(1, NT)
  assert np.all(p[:, 1, i, i - 1] == 0)
  ref = scores0[:, 1].copy()
  ref[:, i, i - 1] = -np.inf
  np.testing.assert_allclose(p[:, 1], softmax(ref), rtol=1e-6, atol=1e-7)  # float32 softmax
  np.testing.assert_array_equal(p[:, [0, 2, 3]], attn(out["none"][1], 0)[:, [0, 2, 3]])
  p = attn(out["temperature"][1], 0)
  # Scores up to 8 divided by 0.5: float32 rounding of exponents up to 16 (~1e-6 each).
  np.testing.assert_allclose(p[:, 2], softmax(scores0[:, 2] / 0.5), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(p[:, [0, 1, 3]], attn(out["none"][1], 0)[:, [0, 1, 3]])


def test_copy_clamp(out):
  logits, acts = out["copy"]
  s = attn(acts, 1, "scores")[:, 1].astype(np.float64)  # [B, T, T]
  for b in range(NB):
    for p in range(NT):
      if not ROWS[b, p]:
        np.testing.assert_array_equal(logits[b, p], out["none"][0][b, p])
        continue
      for y in range(SPEC.num_outputs):
        keys = [j for j in range(1, p + 1) if TOKENS[b, j] == y]
        if not keys:
          assert np.isneginf(logits[b, p, y]), (b, p, y)
        elif len(keys) == 1:
          assert logits[b, p, y] == np.float32(s[b, p, keys[0]])  # the score itself
        else:
          # log-sum-exp in float32 against float64: relative 1e-6.
          np.testing.assert_allclose(logits[b, p, y], np.logaddexp.reduce(s[b, p, keys]),
                                     rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(acts["logits"], logits)


def test_preserve(out):
  for a, b in zip(jax.tree.leaves(out["preserve_all"]), jax.tree.leaves(out["none"])):
    np.testing.assert_array_equal(a, b)
  acts = out["preserve_pattern_ablate"][1]
  np.testing.assert_array_equal(attn(acts, 1), attn(out["none"][1], 1))
  assert np.all(attn(acts, 0, "v") == 0)
  np.testing.assert_array_equal(acts["layer_0"]["resid_post"], acts["embed"])


def test_grafts_equal_hybrid_models(out, plain):
  def hybrid(lower, upper):
    h = dict(upper)
    h["embed_tokens"], h["layer_0"] = lower["embed_tokens"], lower["layer_0"]
    return h
  close = dict(rtol=1e-6, atol=1e-5)  # another (unbatched) program: float32 rounding
  np.testing.assert_allclose(out["graft_in"][0], plain(hybrid(DONOR, PARAMS))[0], **close)
  np.testing.assert_allclose(out["graft_out"][0], plain(hybrid(PARAMS, DONOR))[0], **close)


@pytest.mark.parametrize("text, name", [
    ("layer1()", "layer1()"),
    ("silence_non_label()", "silence_non_label()"),
    ("prev_token(layer=0, only_labels=true)", "prev_token(only_labels=true)"),
    ("disallow_prev_token(layer=0, only_labels=true)", "disallow_prev_token(only_labels=true)"),
])
def test_label_clamps_are_refused(text, name):
  with pytest.raises(ConfigError) as e:
    C.build(SPEC, [C.parse(text)])
  msg = str(e.value)
  assert e.value.field == "clamps" and "\n" not in msg
  assert name in msg and "repeat_tokens" in msg, msg


# --------------------------------------------------------------------------
# 6-7. Grids and training.


def token_config(**fields):
  c = config_lib.base_config()
  values = {"task.name": "repeat_tokens", "model.num_heads": 2, "model.d_model": 16,
            "tokens.seq_len": 12, "tokens.vocab_size": 6, "tokens.segment_len": 3,
            "tokens.num_repeats": 1,
            "train.num_sequences": 64, "train.batch_size": 8, "train.learning_rate": 1e-3,
            "train.eval_every": 64, "eval.size": 16, "eval.batch": 16,
            "checkpoint.every": 64, "checkpoint.resume_every": 0}
  values.update({k.replace("__", "."): v for k, v in fields.items()})
  for k, v in values.items():
    config_lib.set_field(c, k, v)
  return c


@pytest.mark.parametrize("condition", ["layer1", "layer1_copy"])
def test_layer1_condition_is_refused(condition):
  with pytest.raises(ConfigError) as e:
    build.validate(token_config(clamp__condition=condition, clamp__keep_head=0))
  assert e.value.field == "clamp.condition"
  assert "layer1()" in str(e.value) and "repeat_tokens" in str(e.value)


def test_segments_must_fit():
  with pytest.raises(ConfigError, match="2 segments of 6 tokens need 12 positions") as e:
    build.validate(token_config(tokens__segment_len=6))  # T = 12: 11 after BOS
  assert e.value.field == "tokens.segment_len"


GRID = ["clamp.condition=none,prev_token", "seeds.init=0,1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A token-task grid mixing clamp conditions, trained by icldyn:
  (config, workdir, the programs the runner compiled)."""
  cfg = token_config(tokens__seq_len=16, tokens__vocab_size=8, tokens__segment_len=4,
                     train__num_sequences=256, train__batch_size=16, train__eval_every=128,
                     eval__size=32, eval__batch=32, checkpoint__every=128)
  workdir = str(tmp_path_factory.mktemp("tokens"))
  compiled = []
  real = group_lib.compile_program

  def counting(fn, *args, **kwargs):
    compiled.append(fn)
    return real(fn, *args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(group_lib, "compile_program", counting)
    runner.train(cfg, workdir, axes=GRID, quiet=True)
  return cfg, workdir, compiled


def test_clamp_grid_compiles_once(trained):
  cfg, workdir, compiled = trained
  prepared = build.prepare(cfg, GRID)
  assert len(prepared.groups) == 1  # one group: one program for the 4 runs
  pg = prepared.groups[0]
  conditions = [s["clamp.condition"] for s in pg.group.settings]
  assert sorted(conditions) == ["none", "none", "prev_token", "prev_token"]
  # The runner compiled one init, one chunk (for its 16 steps, 2 chunks) and
  # one evaluation program for the whole grid.
  assert len(compiled) == 3 and len(set(compiled)) == 3
  store = ckpt_lib.Store(workdir, 0, read_only=True)
  steps = store.stream_steps()
  assert steps == [128, 256]
  first, last = store.restore_params(128), store.restore_params(256)
  store.close()
  # A fixed pattern gives the first layer's head 0 no query/key gradient, so
  # Adam moves it by exactly 0 (here from step 128 to 256); unclamped runs and
  # other heads move.
  attn0 = lambda p, w, r: np.asarray(p["layer_0"]["attn"][w][r])  # noqa: E731
  for r, cond in enumerate(conditions):
    for w in ("w_q", "w_k"):
      moved = not np.array_equal(attn0(last, w, r)[:, 0], attn0(first, w, r)[:, 0])
      assert moved == (cond == "none"), (r, cond, w)
      assert not np.array_equal(attn0(last, w, r)[:, 1], attn0(first, w, r)[:, 1])
  # The group's forward pass as one jitted program: the conditions are data,
  # so any order of the runs reuses it and gives each run its own result.
  tokens = np.concatenate([np.zeros((3, 1), np.int32), np.tile(
      np.random.default_rng(6).integers(1, 9, size=(3, 5)), 3)], 1)  # [3, 16]
  batch = batch_of(tokens)
  fwd = jax.jit(jax.vmap(lambda p, pr: train_lib.forward(pg.static, p, batch, pr, pg.static.plan)))
  logits, acts = jax.device_get(fwd(last, pg.props))
  perm = [2, 0, 3, 1]
  logits_p, acts_p = jax.device_get(fwd(jax.tree.map(lambda x: x[perm], last),
                                        jax.tree.map(lambda x: x[perm], pg.props)))
  assert fwd._cache_size() == 1
  np.testing.assert_array_equal(logits_p, logits[perm])
  pattern = acts["layer_0"]["attn"]["pattern"]  # [R, B, H, T, T]
  np.testing.assert_array_equal(acts_p["layer_0"]["attn"]["pattern"], pattern[perm])
  prev = np.eye(16, k=-1, dtype=np.float32)
  prev[0, 0] = 1
  for r, cond in enumerate(conditions):
    assert np.array_equal(pattern[r][:, 0], np.broadcast_to(prev, (3, 16, 16))) == (cond != "none")


def test_train_end_to_end(trained):
  cfg, workdir, _ = trained
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["evaluator"] == "tok_train"]
  want = {"loss", "acc", "loss_repeated", "acc_repeated", "loss_other", "icl_score"}
  want |= {f"{m}.h{h}" for m in ("prefix_matching", "prev_token") for h in range(2)}
  assert {r["run"] for r in rows} == {"0", "1", "2", "3"}
  assert sorted({int(r["step"]) for r in rows}) == [0, 128, 256]
  for run in ("0", "1", "2", "3"):
    for step in (0, 128, 256):
      got = {r["metric"]: float(r["value"]) for r in rows
             if r["run"] == run and int(r["step"]) == step}
      assert want <= set(got), want - set(got)
      # Every sequence repeats (tokens.repeat_prob = 1): every metric is defined.
      assert all(math.isfinite(got[m]) for m in want), got
      assert 0 <= got["acc"] <= 1 and 0 <= got["acc_repeated"] <= 1 and got["loss"] > 0
      # Induction rows are a subset of the rows: attention on them is in [0, 1].
      assert all(-1e-6 <= got[f"prefix_matching.h{h}"] <= 1 + 1e-6 for h in range(2))
