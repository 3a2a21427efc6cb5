"""Per-head attention scores defined by a task's reference targets.

Every task that provides `Targets` and a `Layout` gets these two progress
measures; evaluators log them per head and `icldyn analyze` computes them
from checkpoints.

- Induction score (Singh et al. 2024 "induction strength"; Olsson et al.
  2022 "prefix matching"): at each induction row, the attention on the
  induction targets minus the attention on the contrast keys. Few-shot: the
  query's attention to the label tokens after exemplars of its class minus
  that to the other label tokens (a perfect induction head scores 1, a head
  ignoring labels 0). Tokens: the attention from a repeated token to the
  token after its earlier occurrence(s), with no contrast (a perfect
  induction head scores 1, uniform attention over i keys 1/i, near 0).
- Previous-token score (chance corrected): at position i (i + 1 keys
  visible) with attention a to i - 1, a - (1 - a) / (i + 1), averaged over
  the task's previous-token rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from icldyn.tasks.base import Layout, Targets


def induction_rows(pattern: jax.Array, targets: Targets) -> tuple[jax.Array, jax.Array]:
  """Per-sequence sums of the induction score over rows, and the row counts.

  Args:
    pattern: [B, H, T, T] attention pattern of a layer.
    targets: the batch's targets ([B, ...] fields).

  Returns:
    (sums [B, H], counts [B]): the score summed over each sequence's
    induction rows, and how many rows it has. Means over a set of sequences
    are sum(sums) / sum(counts), so every row weighs the same.
  """
  sign = (targets.induction.astype(pattern.dtype)
          - targets.contrast.astype(pattern.dtype))[:, None]  # [B, 1, T, T]
  per_row = jnp.sum(pattern * sign, axis=-1)  # [B, H, T]
  rows = targets.rows[:, None, :]
  sums = jnp.sum(jnp.where(rows, per_row, 0.0), axis=-1)
  return sums, jnp.sum(targets.rows, axis=-1).astype(pattern.dtype)


def prev_token(pattern: jax.Array, layout: Layout) -> jax.Array:
  """Per-sequence chance-corrected previous-token score of each head.

  Args:
    pattern: [B, H, T, T].
    layout: the task's layout (its `prev_rows`).

  Returns:
    [B, H].
  """
  pos = np.asarray(layout.prev_rows)
  a = pattern[:, :, pos, pos - 1]  # [B, H, rows]
  return jnp.mean(a - (1.0 - a) / (pos + 1.0), axis=-1)
