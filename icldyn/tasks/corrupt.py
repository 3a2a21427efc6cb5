"""Corrupted inputs for patching: each task's ways of breaking the in-context signal.

Activation and path patching (`icldyn.patching`; Wang et al. 2022, "Interpretability
in the Wild", arXiv 2211.00593) compare a *clean* batch with a *corrupted*
one that differs only in what the circuit under study reads. What breaks
the signal is the task's to say, so every task registers its corruptions
here, beside its own module, with a read-out that says which logits the
effect is measured on.

Few-shot (`fewshot`):
  - `permute_labels`: the context's labels are permuted (each distinct label
    in the context becomes the next one in sorted order; with the paper's two
    labels in context, the two labels swap). The exemplars are untouched, so
    a circuit that matches the query's exemplar and copies the label after
    it now copies the foil.
  - `query_class`: the query's exemplar is replaced by the query exemplar of
    another sequence of the batch whose class is not in this sequence's
    context (the first of the next 8 sequences that qualifies; in the rare
    batch where none does, the next one). Nothing in the context matches the
    query any more.
  - `context_exemplars`: the context's exemplars (labels kept) are those of
    another sequence of the batch whose context holds no exemplar of this
    query's class (searched as for `query_class`). What a previous-token
    head writes at the label positions, which the induction head's keys
    read, no longer matches the query.
  Read-out: the query (the last row), target the clean target label, foil
  the other label in the clean context (the distractor's label).

Tokens (`repeat_tokens`):
  - `break_copies`: every token of a copy of the repeated segment (the
    positions `TokenBatch.repeated` marks and the one after each) is replaced
    by the token at the same position of the next sequence of the batch; the
    original segment stays. A copy no longer repeats anything.
  - `resample`: the whole sequence is the next sequence of the batch (Wang
    et al.'s "ABC" distribution: same statistics, unrelated content).
  Read-out: the clean batch's repeated positions (p with tokens p and p+1 in
  the same copy), target the clean token p+1, foil the corrupted batch's
  token p+1 (positions where the two agree count for loss and accuracy but
  not for the logit difference).

Each corruption is deterministic in the batch (rolls along the batch axis,
no key), so a batch and its corruption are fixed by the run's evaluation
set.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from icldyn.errors import ConfigError, did_you_mean
from icldyn.tasks import fewshot, repeat_tokens


class Readout(NamedTuple):
  """Which logits a patching metric reads, per read-out row of a batch.

  Attributes:
    target: [B, R] int32, the clean run's correct output.
    foil: [B, R] int32, the output the corruption favours (the logit
      difference is target minus foil).
    weight: [B, R] float32, 1 where the row counts, else 0.
  """
  target: jax.Array
  foil: jax.Array
  weight: jax.Array


# --------------------------------------------------------------------------
# Few-shot.


def _fewshot_readout(clean: fewshot.Batch) -> Readout:
  labels = clean.labels
  b, r = labels.shape
  target = labels[:, -1]
  other = labels[:, :-1] != target[:, None]  # [B, C]
  foil = jnp.where(jnp.any(other, axis=1),
                   jnp.take_along_axis(labels[:, :-1], jnp.argmax(other, axis=1)[:, None], 1)[:, 0],
                   target)
  weight = jnp.zeros((b, r), jnp.float32).at[:, -1].set(1.0)
  return Readout(target=jnp.broadcast_to(target[:, None], (b, r)).astype(jnp.int32),
                 foil=jnp.broadcast_to(foil[:, None], (b, r)).astype(jnp.int32), weight=weight)


def permute_labels(clean: fewshot.Batch) -> tuple[fewshot.Batch, Readout]:
  """The context labels mapped by the cyclic permutation of the distinct context labels.

  Args:
    clean: a few-shot batch ([B, C+1, ...]).

  Returns:
    (corrupted batch, read-out of the clean batch).
  """
  clean = jax.tree.map(jnp.asarray, clean)
  ctx = clean.labels[:, :-1]  # [B, C]
  c = ctx.shape[1]
  big = jnp.iinfo(jnp.int32).max
  distinct = jax.vmap(lambda x: jnp.unique(x, size=c, fill_value=big))(ctx)  # sorted, [B, C]
  count = jnp.sum(distinct != big, axis=1)  # [B]
  index = jnp.argmax(distinct[:, None, :] == ctx[:, :, None], axis=2)  # [B, C]
  nxt = jnp.take_along_axis(distinct, (index + 1) % count[:, None], axis=1)
  labels = clean.labels.at[:, :-1].set(nxt.astype(clean.labels.dtype))
  return clean._replace(labels=labels), _fewshot_readout(clean)


def query_class(clean: fewshot.Batch, tries: int = 8) -> tuple[fewshot.Batch, Readout]:
  """The query's exemplar replaced by one of a class absent from the context.

  Args:
    clean: a few-shot batch.
    tries: how many following sequences to look at for a query whose class
      is not in the context.

  Returns:
    (corrupted batch, read-out of the clean batch).
  """
  clean = jax.tree.map(jnp.asarray, clean)
  q_class, q_input = clean.classes[:, -1], clean.inputs[:, -1]
  ctx = clean.classes[:, :-1]
  shifts = jnp.arange(1, tries + 1)
  cand = jnp.stack([jnp.roll(q_class, -s) for s in range(1, tries + 1)], axis=1)  # [B, tries]
  ok = ~jnp.any(cand[:, :, None] == ctx[:, None, :], axis=2)
  pick = jnp.where(jnp.any(ok, axis=1), jnp.argmax(ok, axis=1), 0)  # [B]
  src = (jnp.arange(q_class.shape[0]) + shifts[pick]) % q_class.shape[0]
  inputs = clean.inputs.at[:, -1].set(q_input[src])
  classes = clean.classes.at[:, -1].set(q_class[src])
  rows = clean.table_rows
  if rows is not None:  # the query's exemplar as a row of the same table
    rows = rows._replace(index=rows.index.at[:, -1].set(rows.index[src, -1]))
  return (clean._replace(inputs=inputs, classes=classes, table_rows=rows),
          _fewshot_readout(clean))


def context_exemplars(clean: fewshot.Batch, tries: int = 8) -> tuple[fewshot.Batch, Readout]:
  """The context's exemplars taken from a sequence whose context lacks the query's class.

  Args:
    clean: a few-shot batch.
    tries: how many following sequences to look at.

  Returns:
    (corrupted batch, read-out of the clean batch).
  """
  clean = jax.tree.map(jnp.asarray, clean)
  q_class, ctx = clean.classes[:, -1], clean.classes[:, :-1]
  n = q_class.shape[0]
  shifts = jnp.arange(1, tries + 1)
  cand = jnp.stack([jnp.roll(ctx, -s, axis=0) for s in range(1, tries + 1)], axis=1)  # [B, tries, C]
  ok = ~jnp.any(cand == q_class[:, None, None], axis=2)
  pick = jnp.where(jnp.any(ok, axis=1), jnp.argmax(ok, axis=1), 0)
  src = (jnp.arange(n) + shifts[pick]) % n
  inputs = clean.inputs.at[:, :-1].set(clean.inputs[src, :-1])
  classes = clean.classes.at[:, :-1].set(ctx[src])
  rows = clean.table_rows
  if rows is not None:
    rows = rows._replace(index=rows.index.at[:, :-1].set(rows.index[src, :-1]))
  return (clean._replace(inputs=inputs, classes=classes, table_rows=rows),
          _fewshot_readout(clean))


# --------------------------------------------------------------------------
# Tokens.


def _token_readout(clean: repeat_tokens.TokenBatch, corrupt_tokens: jax.Array) -> Readout:
  nxt = lambda t: jnp.concatenate([t[:, 1:], jnp.zeros_like(t[:, :1])], axis=1)  # noqa: E731
  return Readout(target=nxt(clean.tokens), foil=nxt(corrupt_tokens),
                 weight=clean.repeated.astype(jnp.float32))


def break_copies(clean: repeat_tokens.TokenBatch) -> tuple[repeat_tokens.TokenBatch, Readout]:
  """Tokens of every copy replaced by the next sequence's tokens at those positions.

  Args:
    clean: a token batch ([B, T]).

  Returns:
    (corrupted batch, read-out of the clean batch).
  """
  clean = jax.tree.map(jnp.asarray, clean)
  rep = clean.repeated
  in_copy = rep | jnp.concatenate([jnp.zeros_like(rep[:, :1]), rep[:, :-1]], axis=1)
  tokens = jnp.where(in_copy, jnp.roll(clean.tokens, -1, axis=0), clean.tokens)
  return clean._replace(tokens=tokens), _token_readout(clean, tokens)


def resample(clean: repeat_tokens.TokenBatch) -> tuple[repeat_tokens.TokenBatch, Readout]:
  """Every sequence replaced by the next one of the batch (its read-out stays the clean one)."""
  clean = jax.tree.map(jnp.asarray, clean)
  tokens = jnp.roll(clean.tokens, -1, axis=0)
  return (clean._replace(tokens=tokens, repeated=jnp.roll(clean.repeated, -1, axis=0)),
          _token_readout(clean, tokens))


CORRUPTIONS: dict[str, dict[str, Callable[[Any], tuple[Any, Readout]]]] = {
    fewshot.TASK.name: {"permute_labels": permute_labels, "query_class": query_class,
                        "context_exemplars": context_exemplars},
    repeat_tokens.TASK.name: {"break_copies": break_copies, "resample": resample},
}
DEFAULT = {fewshot.TASK.name: "permute_labels", repeat_tokens.TASK.name: "break_copies"}


def get(task: str, name: str | None = None) -> Callable[[Any], tuple[Any, Readout]]:
  """A task's corruption by name (None: the task's default), raising ConfigError."""
  known = CORRUPTIONS.get(task, {})
  name = DEFAULT.get(task) if name is None else name
  if name not in known:
    raise ConfigError("--corruption", f"task {task} has no corruption {name!r}"
                      f"{did_you_mean(str(name), known)} (known: {', '.join(known) or 'none'})")
  return known[name]


def clean_readout(task: str, batch: Any) -> Readout:
  """The read-out of a clean batch alone (its foil from the task's default corruption)."""
  return get(task)(batch)[1]
