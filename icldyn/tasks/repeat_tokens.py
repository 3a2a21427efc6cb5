"""Next-token prediction over token sequences with a repeated segment, `task.name=repeat_tokens`.

The setting in which induction heads were found (Elhage et al. 2021, "A
Mathematical Framework for Transformer Circuits"; Olsson et al. 2022,
"In-context Learning and Induction Heads"): a sequence of T tokens begins
with a beginning-of-sequence token (id 0); the other T - 1 are drawn i.i.d.
over a vocabulary of V tokens (ids 1..V, uniform or Zipf); in a share
`repeat_prob` of the sequences a random segment of `segment_len` tokens is
copied `num_repeats` times later in the same sequence (copies placed at
random, without overlap, or right after the original). The model predicts
the next token at every position; only a mechanism that looks back in the
context (an induction head) can predict the tokens of a copy after its
first.

Config group `tokens.*` (per-run: `vocab_size`, `segment_len`,
`repeat_prob`, `zipf_alpha`; the grid pads the vocabulary to its largest
value, and per-token embeddings and unembeddings are drawn per token, so a
padded run starts where it starts alone).

Evaluators: `tok_train` (the training distribution) and `tok_repeat` (the
same, every sequence holding a repeat). Metrics (docs/interfaces.md):
`loss`, `acc` over every predicted token; `loss_repeated`, `acc_repeated`
over the predictable tokens of copies (a position whose token and next
token both lie in the same copy); `loss_other` over the rest; `icl_score`, Olsson
et al.'s in-context learning score (their loss at token 500 minus loss at
token 50 of 512), with positions scaled to T: the mean loss of predicting
token round(500/512 (T-1)) minus that of token round(50/512 (T-1)) (tokens
counted after the BOS token, 1-based); per head `prefix_matching.h{h}`
(last layer: attention from a token that occurred before to the token after
its earlier occurrence(s), Olsson et al.'s prefix-matching score) and
`prev_token.h{h}` (first layer, chance corrected, `icldyn.tasks.scores`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from icldyn import model as model_lib
from icldyn.errors import ConfigError
from icldyn.tasks import base
from icldyn.tasks import scores

BOS = 0  # the beginning-of-sequence token; vocabulary tokens are 1..V
EVALUATORS = ("tok_train", "tok_repeat")
PLACEMENTS = ("random", "adjacent")
# Olsson et al. 2022: in-context learning score = loss(token 500) - loss(token 50) of 512.
ICL_LATE, ICL_EARLY, ICL_CONTEXT = 500, 50, 512


class TokenBatch(NamedTuple):
  """A batch of token sequences.

  Attributes:
    tokens: [B, T] int32, BOS first.
    repeated: [B, T] bool, read-out positions whose prediction a perfect
      induction head gets right: the position and the next one both lie in
      the same copy of the segment (not the original).
  """
  tokens: jax.Array
  repeated: jax.Array


class TokenProps(NamedTuple):
  """Per-run token-task properties (a leading run axis in a grid).

  Attributes:
    token_cdf: [V_cap] float32 CDF over tokens 1..V (1.0 from V on).
    vocab_size: [] int32, V.
    segment_len: [] int32.
    repeat_prob: [] float32.
  """
  token_cdf: jax.Array
  vocab_size: jax.Array
  segment_len: jax.Array
  repeat_prob: jax.Array

  @property
  def num_outputs(self) -> jax.Array:
    """The run's vocabulary size (the front end masks BOS and tokens past it)."""
    return self.vocab_size


@dataclasses.dataclass(frozen=True)
class TokenSpec:
  """Static description of one sampler.

  Attributes:
    seq_len: T (BOS included).
    num_repeats: copies of the segment after the original.
    placement: 'random' or 'adjacent'.
    always_repeat: every sequence holds a repeat (the `tok_repeat` evaluator).
  """
  seq_len: int
  num_repeats: int
  placement: str
  always_repeat: bool = False


# --------------------------------------------------------------------------
# The sampler.


def sample_sequence(key: jax.Array, props: TokenProps, spec: TokenSpec) -> TokenBatch:
  """One sequence (unbatched fields [T])."""
  k_tok, k_rep, k_pos = jax.random.split(key, 3)
  n = spec.seq_len - 1  # body positions, after BOS
  draws = jax.random.uniform(k_tok, (n,))
  body = jax.vmap(base.draw, (None, 0))(props.token_cdf, draws) + 1  # ids 1..V
  has = (jnp.asarray(True) if spec.always_repeat
         else jax.random.uniform(k_rep) < props.repeat_prob)
  k, length = spec.num_repeats, props.segment_len
  free = n - (k + 1) * length  # >= 0 (config validation)
  if spec.placement == "random":
    # Sorted offsets in [0, free], spread by one segment each: copies never overlap.
    offsets = jnp.sort(jax.random.randint(k_pos, (k + 1,), 0, free + 1))
  else:
    offsets = jnp.full((k + 1,), jax.random.randint(k_pos, (), 0, free + 1))
  starts = offsets + jnp.arange(k + 1) * length  # body coordinates
  pos = jnp.arange(n)
  source = pos
  copy = jnp.zeros((n,), jnp.int32)  # which copy a body position lies in (0: none)
  for c in range(1, k + 1):
    inside = has & (pos >= starts[c]) & (pos < starts[c] + length)
    source = jnp.where(inside, starts[0] + pos - starts[c], source)
    copy = jnp.where(inside, c, copy)
  tokens = jnp.concatenate([jnp.full((1,), BOS, jnp.int32), body[source].astype(jnp.int32)])
  # Sequence coordinates: body position i is token i + 1. Read-out p predicts
  # token p + 1, which induction gets right when p and p + 1 lie in the same copy
  # (two copies can touch: the last token of one does not predict the next's first).
  copy = jnp.concatenate([jnp.zeros((1,), jnp.int32), copy])  # [T]
  nxt = jnp.concatenate([copy[1:], jnp.zeros((1,), jnp.int32)])
  repeated = (copy > 0) & (copy == nxt)
  return TokenBatch(tokens=tokens, repeated=repeated)


def sample_batch(key: jax.Array, props: TokenProps, spec: TokenSpec, size: int,
                 first_index: int | jax.Array = 0) -> TokenBatch:
  """`size` sequences; sequence i uses `fold_in(key, first_index + i)`."""
  keys = base.fold_in_keys(key, first_index, size)
  return jax.vmap(sample_sequence, (0, None, None))(keys, props, spec)


def make_props(run: dict, vocab_capacity: int) -> TokenProps:
  """Per-run properties (numpy) from a run's flat settings."""
  return TokenProps(
      token_cdf=base.zipf_cdf(run["tokens.vocab_size"], run["tokens.zipf_alpha"], vocab_capacity),
      vocab_size=np.int32(run["tokens.vocab_size"]),
      segment_len=np.int32(run["tokens.segment_len"]),
      repeat_prob=np.float32(run["tokens.repeat_prob"]))


# --------------------------------------------------------------------------
# The model's front end and the reference attention targets.


@dataclasses.dataclass(frozen=True)
class TokenFront:
  """A token embedding `embed_tokens` ([V_cap + 1, d], BOS = row 0, drawn per
  token from a normal of std 0.02 truncated at 2 std); logits at every position.

  Attributes:
    seq_len: T.
    vocab_size: V_cap, the vocabulary capacity (outputs: V_cap + 1, BOS and
      tokens past a run's V masked).
  """
  seq_len: int
  vocab_size: int
  output_embedding: tuple[str, str] = ("embed_tokens", "embedding")

  @property
  def num_outputs(self) -> int:
    return self.vocab_size + 1

  def embed(self, batch: TokenBatch, d_model: int) -> jax.Array:
    table = model_lib.Embed(self.num_outputs, d_model, name="embed_tokens",
                            embedding_init=model_lib.per_output_init(0.02, 0, corrected=False))
    return table(batch.tokens)

  def readout(self, final: jax.Array) -> jax.Array:
    return final

  def output_mask(self, num_outputs: jax.Array) -> jax.Array:
    """[V_cap + 1] bool: tokens 1..V (BOS is never a target)."""
    ids = jnp.arange(self.num_outputs)
    return (ids >= 1) & (ids <= num_outputs)

  def dummy_batch(self) -> TokenBatch:
    return TokenBatch(tokens=jnp.zeros((1, self.seq_len), jnp.int32),
                      repeated=jnp.zeros((1, self.seq_len), bool))

  @property
  def layout(self) -> base.Layout:
    t = self.seq_len
    # No label tokens, and no layer-1 clamp: every position is both a query
    # (it looks for its own token) and a key (it holds its previous token), so
    # replacing a position by its previous token, as the few-shot task's
    # layer-1 clamp does, would erase what the layer-2 query needs.
    return base.Layout(task=RepeatTokens.name, seq_len=t, readout=tuple(range(t)),
                       prev_rows=tuple(range(1, t)), induction_rows=tuple(range(1, t)))

  def token_labels(self, batch: TokenBatch) -> np.ndarray:
    """[B, T] str: the token ids, for figures (`BOS` at position 0)."""
    tokens = np.asarray(batch.tokens)
    return np.where(tokens == 0, "BOS", tokens.astype(str))

  def targets(self, batch: TokenBatch) -> base.Targets:
    """Row p's induction targets: the keys j with token x_{j-1} = x_p, j - 1 < p."""
    x = batch.tokens
    b, t = x.shape
    earlier = np.tril(np.ones((t, t), bool), -1)  # key before row
    same = (x[:, :, None] == x[:, None, :]) & earlier  # [B, T(row), T(key)]
    induction = jnp.pad(same[:, :, :-1], ((0, 0), (0, 0), (1, 0)))  # key j <- j - 1
    support = jnp.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))
    key_outputs = jnp.where(jnp.arange(t) == 0, -1, x)  # BOS holds no output
    return base.Targets(induction=induction, contrast=jnp.zeros_like(induction),
                        support=support, rows=jnp.any(induction, axis=-1),
                        match_sim=induction.astype(jnp.float32), key_outputs=key_outputs)


# --------------------------------------------------------------------------
# Metrics.


def icl_positions(seq_len: int) -> tuple[int, int]:
  """(early, late) read-out positions of the in-context learning score.

  Olsson et al.'s tokens 50 and 500 of 512, scaled to the T - 1 tokens after
  BOS: token k (1-based after BOS) is predicted at read-out position k - 1.
  """
  n = seq_len - 1
  early = max(1, round(ICL_EARLY / ICL_CONTEXT * n))
  late = max(early + 1, min(n, round(ICL_LATE / ICL_CONTEXT * n)))
  return early - 1, late - 1


def per_sequence(logits: jax.Array, batch: TokenBatch) -> dict[str, jax.Array]:
  """Per-sequence sums and counts of a batch's next-token terms.

  Args:
    logits: [B, T, L] at every position.
    batch: the batch.

  Returns:
    dict of [B] arrays: loss_sum, correct_sum, count (every prediction);
    loss_repeated_sum, correct_repeated_sum, count_repeated; loss_early,
    loss_late (the in-context learning score's two positions).
  """
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # predictions of tokens 1..T-1
  target = batch.tokens[:, 1:]
  loss = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]  # [B, T-1]
  correct = (jnp.argmax(logits[:, :-1], axis=-1) == target).astype(jnp.float32)
  rep = batch.repeated[:, :-1].astype(jnp.float32)
  early, late = icl_positions(batch.tokens.shape[1])
  return {
      "loss_sum": jnp.sum(loss, -1), "correct_sum": jnp.sum(correct, -1),
      "count": jnp.full(loss.shape[:1], loss.shape[1], jnp.float32),
      "loss_repeated_sum": jnp.sum(loss * rep, -1), "correct_repeated_sum": jnp.sum(correct * rep, -1),
      "count_repeated": jnp.sum(rep, -1),
      "loss_early": loss[:, early], "loss_late": loss[:, late],
  }


def reduce_sequences(terms: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The metrics of a set of sequences from `per_sequence` terms ([N] arrays).

  Means are over predicted tokens (every token weighs the same); a metric
  over an empty set of tokens is NaN.
  """
  tot = lambda k: jnp.sum(terms[k])  # noqa: E731
  def ratio(a, b):
    return jnp.where(b > 0, a / jnp.maximum(b, 1.0), jnp.nan)
  n, n_rep = tot("count"), tot("count_repeated")
  return {
      "loss": ratio(tot("loss_sum"), n),
      "acc": ratio(tot("correct_sum"), n),
      "loss_repeated": ratio(tot("loss_repeated_sum"), n_rep),
      "acc_repeated": ratio(tot("correct_repeated_sum"), n_rep),
      "loss_other": ratio(tot("loss_sum") - tot("loss_repeated_sum"), n - n_rep),
      "icl_score": jnp.mean(terms["loss_late"]) - jnp.mean(terms["loss_early"]),
  }


EVAL_METRICS = ("loss", "acc", "loss_repeated", "acc_repeated", "loss_other", "icl_score")


# --------------------------------------------------------------------------
# The task's static spec of a group, and its host-side definition.


@dataclasses.dataclass(frozen=True)
class RepeatTokensSpec(base.TaskSpec):
  """The token task in one compile group (hashable)."""
  front: TokenFront
  train_seq: TokenSpec
  evaluators: tuple[str, ...]
  name: str = "repeat_tokens"
  head_score_evaluators: tuple[str, ...] = EVALUATORS
  analysis_evaluator: str = "tok_train"
  induction_metric: str = "prefix_matching"

  def sample(self, key, shared, props, stream, size, first_index=0):
    spec = self.train_seq
    if stream == "tok_repeat":
      spec = dataclasses.replace(spec, always_repeat=True)
    return sample_batch(key, props, spec, size, first_index)

  def loss(self, logits, batch):
    """Mean next-token cross-entropy over every predicted token."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, batch.tokens[:, 1:, None], axis=-1))

  def eval_terms(self, evaluator, logits, acts, batch):
    terms = per_sequence(logits, batch)
    if evaluator in self.head_score_evaluators:
      layers = sum(1 for k in acts if k.startswith("layer_"))
      last = acts[f"layer_{layers - 1}"]["attn"]["pattern"]
      terms["induction_sum"], terms["induction_count"] = scores.induction_rows(
          last, self.front.targets(batch))
      terms["prev_token"] = scores.prev_token(acts["layer_0"]["attn"]["pattern"],
                                              self.front.layout)
    return terms

  def reduce(self, evaluator, terms):
    result = reduce_sequences(terms)
    if "induction_sum" in terms:
      count = jnp.sum(terms["induction_count"])
      for h in range(terms["induction_sum"].shape[1]):
        result[f"{self.induction_metric}.h{h}"] = jnp.where(
            count > 0, jnp.sum(terms["induction_sum"][:, h]) / jnp.maximum(count, 1.0), jnp.nan)
        result[f"prev_token.h{h}"] = jnp.mean(terms["prev_token"][:, h])
    return result

  def evaluator_index(self, evaluator):
    return EVALUATORS.index(evaluator)


def _require(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(field, message)


def _int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


class RepeatTokens(base.Task):
  """The host-side definition of the token task (`task.name=repeat_tokens`, fields `tokens.*`)."""
  name = "repeat_tokens"
  group = "tokens"
  per_run_fields = ("tokens.vocab_size", "tokens.segment_len", "tokens.repeat_prob",
                    "tokens.zipf_alpha")
  capacity_fields = ("tokens.vocab_size",)
  evaluators = EVALUATORS
  default_evaluators = ("tok_train",)
  headline = "tok_train/loss_repeated"
  # The repeated tokens' loss falls from about ln V; 1 nat is crossed on the
  # way down for every V >= 8, unclipped (the few-shot default clips at ln 2).
  default_curves = ("tok_train/loss_repeated:down:1.0:none", "tok_train/prefix_matching")
  induction_metric = "prefix_matching"
  references = {"loss_repeated": (("1 nat (timing threshold)", 1.0),)}

  def fields(self) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.seq_len = 64  # T tokens, the BOS token included
    t.vocab_size = 64  # V tokens (ids 1..V; 0 is BOS)
    t.segment_len = 12  # tokens in the repeated segment
    t.num_repeats = 3  # copies after the original (three copies: a quarter of the tokens)
    t.placement = "random"  # random: copies anywhere after the original (no overlap); adjacent
    t.repeat_prob = 1.0  # share of sequences holding a repeat
    t.zipf_alpha = 0.0  # token frequencies p(k) ~ k^-alpha, k = 1..V (0: uniform)
    return t

  def validate(self, cfg) -> None:
    t = cfg.tokens
    _require(_int(t.seq_len) and t.seq_len >= 4, "tokens.seq_len", "must be an integer >= 4")
    _require(_int(t.vocab_size) and t.vocab_size >= 2, "tokens.vocab_size",
             "must be an integer >= 2")
    _require(_int(t.segment_len) and t.segment_len >= 1, "tokens.segment_len", "must be >= 1")
    _require(_int(t.num_repeats) and t.num_repeats >= 1, "tokens.num_repeats", "must be >= 1")
    need = (t.num_repeats + 1) * t.segment_len
    _require(need <= t.seq_len - 1, "tokens.segment_len",
             f"{t.num_repeats + 1} segments of {t.segment_len} tokens need {need} positions, "
             f"but a sequence has {t.seq_len - 1} after BOS (tokens.seq_len={t.seq_len})")
    _require(t.placement in PLACEMENTS, "tokens.placement",
             f"must be one of {PLACEMENTS}, got {t.placement!r}")
    _require(isinstance(t.repeat_prob, (int, float)) and 0 <= t.repeat_prob <= 1,
             "tokens.repeat_prob", "must be in [0, 1]")
    _require(isinstance(t.zipf_alpha, (int, float)) and math.isfinite(t.zipf_alpha)
             and t.zipf_alpha >= 0, "tokens.zipf_alpha", "must be a finite number >= 0")

  def front(self, cfg) -> TokenFront:
    return TokenFront(seq_len=cfg.tokens.seq_len, vocab_size=cfg.tokens.vocab_size)

  def spec(self, cfg, batch_size, eval_batch, evaluators) -> RepeatTokensSpec:
    t = cfg.tokens
    return RepeatTokensSpec(
        front=self.front(cfg),
        train_seq=TokenSpec(seq_len=t.seq_len, num_repeats=t.num_repeats, placement=t.placement),
        evaluators=tuple(evaluators))

  def props(self, settings: Sequence[dict], cfg) -> TokenProps:
    data = [make_props(s, cfg.tokens.vocab_size) for s in settings]
    return jax.tree.map(lambda *xs: np.stack(xs), *data)

  def shared(self, cfg) -> dict:
    return {}


TASK = RepeatTokens()
