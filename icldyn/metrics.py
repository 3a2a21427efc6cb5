"""In-graph metrics: query loss and accuracies, and cheap attention progress measures.

Metrics are computed per sequence and reduced once at the end of an
evaluation, so the mean over a fixed evaluation set does not depend on how it
is split into micro-batches. Definitions are in docs/interfaces.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EVAL_METRICS = ("loss", "acc", "acc_in_context", "acc_out_context", "p_correct",
                "p_correct_in_context", "p_in_context")


def query_xent(logits_q: jax.Array, target: jax.Array) -> jax.Array:
  """Cross-entropy of the target label at the query.

  Args:
    logits_q: [B, L] query logits (-inf for labels the run does not have).
    target: [B] int labels.

  Returns:
    [B] losses.
  """
  logp = jax.nn.log_softmax(logits_q, axis=-1)
  return -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]


def per_sequence(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Per-sequence metric terms of a batch.

  Args:
    logits: [B, C+1, L] logits at exemplar positions (query last).
    labels: [B, C+1] context labels then the target.

  Returns:
    dict of [B] arrays: loss, correct, p_correct, p_correct_in_context,
    p_in_context, target_in_context.
  """
  logits_q, target = logits[:, -1], labels[:, -1]
  num = logits_q.shape[-1]
  logp = jax.nn.log_softmax(logits_q, axis=-1)
  probs = jnp.exp(logp)
  in_ctx = jnp.any(labels[:, :-1, None] == jnp.arange(num)[None, None, :], axis=1)  # [B, L]
  p_correct = jnp.take_along_axis(probs, target[:, None], axis=-1)[:, 0]
  target_in = jnp.take_along_axis(in_ctx, target[:, None], axis=-1)[:, 0]
  p_in = jnp.sum(jnp.where(in_ctx, probs, 0.0), axis=-1)
  return {
      "loss": -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0],
      "correct": (jnp.argmax(logits_q, axis=-1) == target).astype(jnp.float32),
      "p_correct": p_correct,
      "p_correct_in_context": jnp.where(target_in, p_correct / jnp.maximum(p_in, 1e-30), 0.0),
      "p_in_context": p_in,
      "target_in_context": target_in.astype(jnp.float32),
  }


def reduce_sequences(terms: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Means over sequences of `per_sequence` terms ([N] arrays) → metric scalars."""
  n_in = jnp.sum(terms["target_in_context"])
  n_out = terms["target_in_context"].shape[0] - n_in
  correct_in = jnp.sum(terms["correct"] * terms["target_in_context"])
  correct_out = jnp.sum(terms["correct"]) - correct_in
  return {
      "loss": jnp.mean(terms["loss"]),
      "acc": jnp.mean(terms["correct"]),
      "acc_in_context": jnp.where(n_in > 0, correct_in / jnp.maximum(n_in, 1), jnp.nan),
      "acc_out_context": jnp.where(n_out > 0, correct_out / jnp.maximum(n_out, 1), jnp.nan),
      "p_correct": jnp.mean(terms["p_correct"]),
      "p_correct_in_context": jnp.mean(terms["p_correct_in_context"]),
      "p_in_context": jnp.mean(terms["p_in_context"]),
  }


def induction_strength(pattern: jax.Array, classes: jax.Array) -> jax.Array:
  """Per-sequence induction strength of each head (Singh et al. 2024).

  Attention from the query to label tokens that follow an exemplar of the
  query's class, minus attention to the other label tokens. A perfect
  induction head scores 1; a head ignoring labels scores 0.

  Args:
    pattern: [B, H, T, T] attention pattern of a layer.
    classes: [B, C+1] classes of the exemplars (query last).

  Returns:
    [B, H].
  """
  c = classes.shape[1] - 1
  to_labels = pattern[:, :, -1, 1:2 * c:2]  # [B, H, C] query → label tokens
  correct = (classes[:, :-1] == classes[:, -1:])[:, None, :]  # [B, 1, C]
  return jnp.sum(jnp.where(correct, to_labels, -to_labels), axis=-1)


def prev_token_score(pattern: jax.Array) -> jax.Array:
  """Per-sequence chance-corrected previous-token score at label positions.

  At position i (0-based, i+1 keys visible) with attention a to i-1 the score
  is a - (1 - a) / (i + 1); averaged over the label positions 1, 3, ..., 2C-1.

  Args:
    pattern: [B, H, T, T].

  Returns:
    [B, H].
  """
  t = pattern.shape[-1]
  pos = jnp.arange(1, t - 1, 2)
  a = pattern[:, :, pos, pos - 1]  # [B, H, C]
  return jnp.mean(a - (1.0 - a) / (pos + 1.0), axis=-1)
