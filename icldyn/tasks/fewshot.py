"""The few-shot classification task of Singh et al. 2024 (arXiv 2404.07129), `task.name=fewshot`.

A sequence is `C` exemplar-label pairs and a query (Sec. 2; after Chan et
al. 2022): the query's class appears `burstiness` times in the context, the
other slots hold a distractor class (or iid / unique other classes), and
each sequence is relabelled to a random pair of the run's `num_labels`
labels, drawn from a train or held-out split of the label pairs. The model
reads `[x_1, y_1, ..., x_C, y_C, x_q]` (exemplar and label embeddings
interleaved) and is trained on the label of the query; its logits are read
at exemplar positions.

This module owns everything specific to the task: its config group `data.*`
(the name predates tasks; study files and workdirs keep it), its samplers,
front end, evaluators (`fsl_train`, `fsl_val_rl`, `fsl_train_valex`,
`fsl_test_class`) and metrics, and its reference attention targets (the
label token after each exemplar of the query's class).

Determinism across grids. A run's draws must not depend on the grid it sits
in, although a grid pads per-run sizes (training classes, labels) to its
largest value. So every distribution whose support is a per-run size is
sampled by inverse CDF from a host-computed table (float64 cumsum, cast once),
whose first entries do not change with padding; the class table is generated
per class from `fold_in(table_key, class_id)`; label pairs are enumerated in a
canonical order that extends, not reshuffles, when the label count grows;
label embeddings are drawn per label.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from icldyn import model as model_lib
from icldyn.errors import ConfigError
from icldyn.model import core as model_core
from icldyn.tasks import base
from icldyn.tasks import scores

TEST_CLASS_ID_OFFSET = 1_000_000  # class ids of Gaussian test classes (disjoint from train ids)


class TableRows(NamedTuple):
  """The exemplars of a batch as rows of a table: `inputs == x[index]`.

  Attributes:
    x: [R, D] the distinct exemplar rows the sampler draws from (None inside
      `sample_sequence`, which only knows its own indices).
    index: [B, C+1] int32 row of each exemplar.
  """
  x: jax.Array | None
  index: jax.Array


class Batch(NamedTuple):
  """A batch of sequences (see docs/interfaces.md).

  Attributes:
    inputs: [B, C+1, D] float32, context exemplars then the query exemplar.
    labels: [B, C+1] int32, context labels then the query's target label.
    classes: [B, C+1] int32, table rows of each exemplar, query last.
    table_rows: optional `TableRows` with `inputs == table_rows.x[table_rows.index]`,
      set when the sampler's spec asks for it (`SeqSpec.table_rows`): the model
      then embeds the R rows instead of the B (C+1) tokens.
  """
  inputs: jax.Array
  labels: jax.Array
  classes: jax.Array
  table_rows: TableRows | None = None


class DataProps(NamedTuple):
  """Per-run data properties as arrays (a leading run axis in a grid).

  Attributes:
    class_cdf: [N] float32 CDF over training classes (N = class capacity);
      1.0 from the run's last class on.
    pair_cdf_train: [P] float32 CDF over label pairs of the training split.
    pair_cdf_heldout: [P] float32 CDF over held-out label pairs.
    num_labels: [] int32.
    burstiness: [] int32.
    noise: [] float32, per-token input noise scale.
  """
  class_cdf: jax.Array
  pair_cdf_train: jax.Array
  pair_cdf_heldout: jax.Array
  num_labels: jax.Array
  burstiness: jax.Array
  noise: jax.Array

  @property
  def num_outputs(self) -> jax.Array:
    """The run's output count (the model's read-out masks the rest)."""
    return self.num_labels


class Table(NamedTuple):
  """The class table shared by all runs of a group.

  Attributes:
    x: [N + N_test, E, D] float32 exemplars; training classes first.
    test_cdf: [N_test] float32 uniform CDF over test classes.
    pair_a, pair_b: [P] int32, the labels of each canonical pair (a < b).
  """
  x: jax.Array
  test_cdf: jax.Array
  pair_a: jax.Array
  pair_b: jax.Array


@dataclasses.dataclass(frozen=True)
class SeqSpec:
  """Static (shape-level) description of one sampler.

  Attributes:
    context_len: C.
    rest: 'distractor' | 'iid' | 'unique'.
    relabel: per-sequence relabelling.
    classes: 'train' | 'test'.
    exemplars: (lo, hi) exemplar index range.
    pairs: 'train' | 'heldout' label-pair split.
    num_train_classes: class capacity N (offset of the test classes in the table).
    noise: whether any run of the group has input noise (else noise is skipped).
    table_rows: attach `Batch.table_rows` (only without noise: a noisy
      exemplar is no longer a table row).
  """
  context_len: int
  rest: str
  relabel: bool
  classes: str
  exemplars: tuple[int, int]
  pairs: str
  num_train_classes: int
  noise: bool
  table_rows: bool = False


# --------------------------------------------------------------------------
# Host side: tables and per-run properties.


def canonical_pairs(num_labels: int) -> tuple[np.ndarray, np.ndarray]:
  """Label pairs (a, b), a < b, ordered by (b, a): a prefix-stable enumeration.

  Returns:
    (a, b): int32 arrays of length num_labels * (num_labels - 1) / 2.
  """
  a = [i for j in range(1, num_labels) for i in range(j)]
  b = [j for j in range(1, num_labels) for _ in range(j)]
  return np.asarray(a, np.int32), np.asarray(b, np.int32)


def class_cdf(num_classes: int, zipf_alpha: float, capacity: int) -> np.ndarray:
  """Zipf class CDF, p(k) proportional to (k+1)^-alpha for k < num_classes."""
  return base.zipf_cdf(num_classes, zipf_alpha, capacity)


def label_pair_split(num_labels: int, holdout: float, seed: int,
                     label_capacity: int) -> tuple[np.ndarray, np.ndarray]:
  """CDFs over the training and held-out label pairs of one run.

  Each pair gets a priority from `default_rng([seed, a, b])`, so the split of
  a run depends on its own labels and seed only; the `round(holdout * pairs)`
  lowest-priority valid pairs are held out.

  Returns:
    (train_cdf, heldout_cdf), each [P_capacity] float32. Without hold-out the
    held-out CDF equals the training one.
  """
  a, b = canonical_pairs(label_capacity)
  valid = b < num_labels
  prio = np.array([np.random.default_rng([seed, int(i), int(j)]).random()
                   for i, j in zip(a, b)])
  n_valid = int(valid.sum())
  n_held = int(round(holdout * n_valid))
  order = np.argsort(np.where(valid, prio, np.inf), kind="stable")
  held = np.zeros(len(a), bool)
  held[order[:n_held]] = True
  train = valid & ~held
  if n_held == 0:
    held = train
  return base.padded_cdf(train, len(a)), base.padded_cdf(held, len(a))


def make_data_props(run: dict, capacity_classes: int, capacity_labels: int) -> DataProps:
  """Per-run properties (numpy) from a run's flat settings.

  Args:
    run: dict with keys 'data.num_train_classes', 'data.zipf_alpha',
      'data.num_labels', 'data.label_holdout', 'seeds.data',
      'data.burstiness', 'data.noise'.
    capacity_classes: the group's class capacity N.
    capacity_labels: the group's label capacity L.
  """
  train_cdf, held_cdf = label_pair_split(
      run["data.num_labels"], run["data.label_holdout"], run["seeds.data"],
      capacity_labels)
  return DataProps(
      class_cdf=class_cdf(run["data.num_train_classes"], run["data.zipf_alpha"],
                          capacity_classes),
      pair_cdf_train=train_cdf,
      pair_cdf_heldout=held_cdf,
      num_labels=np.int32(run["data.num_labels"]),
      burstiness=np.int32(run["data.burstiness"]),
      noise=np.float32(run["data.noise"]),
  )


def gaussian_table(seed: int, class_ids: np.ndarray, num_exemplars: int, dim: int,
                   exemplar_noise: float) -> np.ndarray:
  """Gaussian classes: mean ~ N(0, I/D), exemplar = mean + eps * N(0, I/D).

  Each class is drawn from `fold_in(key(seed), class_id)`, so a class has the
  same vectors whatever other classes the table holds.

  Returns:
    [len(class_ids), num_exemplars, dim] float32.
  """
  def one(cid):
    k_mean, k_ex = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), cid))
    mean = jax.random.normal(k_mean, (dim,))
    ex = mean + exemplar_noise * jax.random.normal(k_ex, (num_exemplars, dim))
    return ex / np.sqrt(dim)
  return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(class_ids, jnp.uint32)))


def load_file_array(path: str, dataset_key: str) -> np.ndarray:
  """Loads a [classes, exemplars, dim] array from .h5, .npy or .npz.

  The .h5 layout of icl-dynamics' `omniglot_resnet18_randomized_order_s0.h5`
  (dataset key `resnet18/224/feat`) loads as is.
  """
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext in (".h5", ".hdf5"):
      import h5py
      with h5py.File(path, "r") as f:
        if dataset_key not in f:
          raise ConfigError("data.dataset_key",
                            f"no dataset {dataset_key!r} in {path}")
        arr = np.asarray(f[dataset_key])
    elif ext == ".npy":
      with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
          raise ConfigError("data.path", f"{path} is not a .npy file")
      arr = np.load(path, allow_pickle=False)
    elif ext == ".npz":
      with np.load(path, allow_pickle=False) as z:
        key = dataset_key if dataset_key in z.files else (
            z.files[0] if len(z.files) == 1 else None)
        if key is None:
          raise ConfigError("data.dataset_key",
                            f"no array {dataset_key!r} in {path} (has {z.files})")
        arr = z[key]
    else:
      raise ConfigError("data.path", f"unsupported file type {ext!r} (use .h5, .npy, .npz)")
  except ConfigError:
    raise
  except Exception as e:  # unreadable file: a config error naming the field
    raise ConfigError("data.path", f"cannot read {path}: {e}") from e
  if arr.ndim != 3:
    raise ConfigError("data.path",
                      f"expected a [classes, exemplars, dim] array, got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.number):
    raise ConfigError("data.path", f"expected numbers, got dtype {arr.dtype}")
  arr = arr.astype(np.float32)
  if not np.all(np.isfinite(arr)):
    raise ConfigError("data.path", f"{path} holds NaN or inf values")
  return arr


def make_table(cfg, capacity_classes: int, capacity_labels: int) -> Table:
  """The group's class table: training classes [0, N) then the test classes.

  For `data.source='file'`, training classes are the file's first rows and the
  test classes its last `num_test_classes` rows.
  """
  d = cfg.data
  if d.source == "gaussian":
    ids = np.concatenate([np.arange(capacity_classes),
                          TEST_CLASS_ID_OFFSET + np.arange(d.num_test_classes)])
    x = gaussian_table(d.table_seed, ids, d.num_exemplars, d.dim, d.exemplar_noise)
  else:
    arr = load_file_array(d.path, d.dataset_key)
    n, e, dim = arr.shape
    if dim != d.dim:
      raise ConfigError("data.dim", f"{d.path} has dim {dim}, config says {d.dim}")
    if e < d.num_exemplars:
      raise ConfigError("data.num_exemplars",
                        f"{d.path} has {e} exemplars per class, config needs {d.num_exemplars}")
    if capacity_classes + d.num_test_classes > n:
      raise ConfigError("data.num_train_classes",
                        f"{capacity_classes} training + {d.num_test_classes} test classes "
                        f"exceed the {n} classes in {d.path}")
    x = np.concatenate([arr[:capacity_classes, :d.num_exemplars],
                        arr[n - d.num_test_classes:, :d.num_exemplars]])
  pa, pb = canonical_pairs(capacity_labels)
  test_cdf = base.padded_cdf(np.ones(d.num_test_classes), max(d.num_test_classes, 1))
  return Table(x=x, test_cdf=test_cdf, pair_a=pa, pair_b=pb)


def seq_spec(cfg, evaluator: str, capacity_classes: int, noise: bool,
             batch: int | None = None) -> SeqSpec:
  """The static sampler spec of the training stream ('train') or an evaluator.

  With `batch` (sequences per call), the spec asks for `Batch.table_rows`
  when there is no noise and the split has no more exemplar rows than the
  batch has tokens: the model then embeds the rows and gathers
  (docs/performance.md; exact up to float rounding).
  """
  d = cfg.data
  train_ex = (0, d.num_train_exemplars)
  specs = {
      "train": ("train", train_ex, "train"),
      "fsl_train": ("train", train_ex, "train"),
      "fsl_val_rl": ("train", train_ex, "heldout"),
      "fsl_train_valex": ("train", (d.num_train_exemplars, d.num_exemplars), "train"),
      "fsl_test_class": ("test", train_ex if d.test_class_exemplars == "train"
                         else (0, d.num_exemplars), "train"),
  }
  classes, exemplars, pairs = specs[evaluator]
  spec = SeqSpec(context_len=d.context_len, rest=d.rest, relabel=d.relabel,
                 classes=classes, exemplars=exemplars, pairs=pairs,
                 num_train_classes=capacity_classes, noise=noise)
  if batch is not None and not noise:
    rows = _split_classes(spec, d.num_test_classes)[1] * (exemplars[1] - exemplars[0])
    spec = dataclasses.replace(spec, table_rows=rows <= batch * (d.context_len + 1))
  return spec


def _split_classes(spec: SeqSpec, num_test_classes: int) -> tuple[int, int]:
  """(first table row, class count) of the class split `spec` draws from."""
  if spec.classes == "train":
    return 0, spec.num_train_classes
  return spec.num_train_classes, num_test_classes


# --------------------------------------------------------------------------
# Device side: pure samplers.


def _draw_excluding(cdf: jax.Array, u: jax.Array, excluded: list[jax.Array]) -> jax.Array:
  """Inverse-CDF draw conditioned on avoiding the `excluded` (distinct) indices.

  u is scaled to the remaining mass, then shifted past each excluded interval
  in increasing order. A float rounding at an interval's edge (chance ~1e-7)
  can still land on an excluded index; it is then moved to the next index.
  """
  ex = jnp.sort(jnp.stack(excluded))
  before = jnp.where(ex > 0, cdf[jnp.maximum(ex - 1, 0)], 0.0)
  mass = cdf[ex] - before
  v = u * (1.0 - jnp.sum(mass))
  for i in range(len(excluded)):
    v = jnp.where(v >= before[i], v + mass[i], v)
  idx = base.draw(cdf, v)
  for _ in range(len(excluded)):
    idx = jnp.where(jnp.any(idx == ex), idx + 1, idx)
  return jnp.minimum(idx, cdf.shape[0] - 1)


def _distinct_labels(key: jax.Array, count: int, num_labels: jax.Array) -> jax.Array:
  """`count` distinct labels uniformly from [0, num_labels) (exact integer draws).

  Entries past `num_labels` (when count > num_labels) are unused by callers.
  """
  keys = jax.random.split(key, count)
  out = []
  for j in range(count):
    x = jax.random.randint(keys[j], (), 0, jnp.maximum(num_labels - j, 1))
    for used in sorted_prefix(out):
      x = jnp.where(x >= used, x + 1, x)
    out.append(x)
  return jnp.stack(out).astype(jnp.int32)


def sorted_prefix(values: list[jax.Array]) -> list[jax.Array]:
  """The values sorted ascending (as a Python list of scalars)."""
  if not values:
    return []
  s = jnp.sort(jnp.stack(values))
  return [s[i] for i in range(len(values))]


def sample_sequence(key: jax.Array, table: Table, props: DataProps, spec: SeqSpec) -> Batch:
  """One sequence (unbatched Batch fields: [C+1, D], [C+1], [C+1])."""
  c = spec.context_len
  k_q, k_rest, k_perm, k_lab, k_flip, k_ex, k_noise = jax.random.split(key, 7)
  cdf = props.class_cdf if spec.classes == "train" else table.test_cdf
  offset = 0 if spec.classes == "train" else spec.num_train_classes

  q = base.draw(cdf, jax.random.uniform(k_q))
  # Rest candidates in slot-rank order: the slot of rank m >= B takes rest[m - B].
  if spec.rest == "distractor":
    rest = jnp.full((c,), _draw_excluding(cdf, jax.random.uniform(k_rest), [q]))
  elif spec.rest == "iid":
    us = jax.random.uniform(k_rest, (c,))
    rest = jnp.stack([_draw_excluding(cdf, us[m], [q]) for m in range(c)])
  else:  # unique
    us = jax.random.uniform(k_rest, (c,))
    chosen = [q]
    for m in range(c):
      chosen.append(_draw_excluding(cdf, us[m], chosen))
    rest = jnp.stack(chosen[1:])
  rank = jnp.argsort(jax.random.permutation(k_perm, c))  # rank of each slot
  is_query = rank < props.burstiness
  rest_index = jnp.clip(rank - props.burstiness, 0, c - 1)
  slot_class = jnp.where(is_query, q, rest[rest_index])

  if not spec.relabel:
    slot_label = (slot_class + offset) % props.num_labels
    q_label = (q + offset) % props.num_labels
  elif spec.rest == "distractor":
    pair_cdf = props.pair_cdf_train if spec.pairs == "train" else props.pair_cdf_heldout
    p = base.draw(pair_cdf, jax.random.uniform(k_lab))
    flip = jax.random.bernoulli(k_flip)
    q_label = jnp.where(flip, table.pair_b[p], table.pair_a[p])
    d_label = jnp.where(flip, table.pair_a[p], table.pair_b[p])
    slot_label = jnp.where(is_query, q_label, d_label)
  else:
    labels = _distinct_labels(k_lab, c + 1, props.num_labels)  # query, then rest by rank
    # iid rest classes may repeat: a repeated class takes the label of its first occurrence.
    same = rest[:, None] == rest[None, :]
    first = jnp.argmax(same, axis=1)
    rest_label = labels[1:][first]
    q_label = labels[0]
    slot_label = jnp.where(is_query, q_label, rest_label[rest_index])

  classes = jnp.concatenate([slot_class, q[None]]) + offset
  lo, hi = spec.exemplars
  ex = jax.random.randint(k_ex, (c + 1,), lo, hi)
  inputs = table.x[classes, ex]
  if spec.noise:
    dim = inputs.shape[-1]
    inputs = inputs + props.noise * jax.random.normal(k_noise, inputs.shape) / np.sqrt(dim)
  labels = jnp.concatenate([slot_label, q_label[None]]).astype(jnp.int32)
  rows = None
  if spec.table_rows:
    rows = TableRows(x=None, index=((classes - offset) * (hi - lo) + ex - lo).astype(jnp.int32))
  return Batch(inputs=inputs, labels=labels, classes=classes.astype(jnp.int32), table_rows=rows)


def table_rows_of(table: Table, spec: SeqSpec) -> jax.Array:
  """The [R, D] exemplar rows `spec` draws from, in `TableRows.index` order."""
  lo, hi = spec.exemplars
  first, n = _split_classes(spec, table.x.shape[0] - spec.num_train_classes)
  x = table.x[first:first + n, lo:hi]
  return x.reshape((-1, x.shape[-1]))


def sample_batch(key: jax.Array, table: Table, props: DataProps, spec: SeqSpec,
                 size: int, first_index: int | jax.Array = 0) -> Batch:
  """`size` sequences; sequence i uses `fold_in(key, first_index + i)`.

  Keys per sequence index make a fixed evaluation set independent of how it is
  split into micro-batches.
  """
  keys = base.fold_in_keys(key, first_index, size)
  batch = jax.vmap(sample_sequence, (0, None, None, None))(keys, table, props, spec)
  if spec.table_rows:
    batch = batch._replace(table_rows=batch.table_rows._replace(x=table_rows_of(table, spec)))
  return batch


def mixture(key: jax.Array, batches: list[Batch], weights: jax.Array) -> Batch:
  """Per-sequence mixture of samplers: sequence i comes from batch j ~ weights.

  Args:
    key: PRNG key of the choice.
    batches: list of equally shaped Batches from different samplers.
    weights: [len(batches)] non-negative mixture weights.
  """
  n = batches[0].labels.shape[0]
  choice = jax.random.categorical(key, jnp.log(weights), shape=(n,))
  def pick(*leaves):
    stacked = jnp.stack(leaves)
    return jnp.take_along_axis(
        stacked, choice.reshape((1, n) + (1,) * (stacked.ndim - 2)), axis=0)[0]
  return jax.tree.map(pick, *batches)


# --------------------------------------------------------------------------
# Metrics (docs/interfaces.md).

EVALUATORS = ("fsl_train", "fsl_val_rl", "fsl_train_valex", "fsl_test_class")
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


# --------------------------------------------------------------------------
# The model's front end and the reference attention targets.


@dataclasses.dataclass(frozen=True)
class FewShotFront:
  """Exemplar and label embeddings interleaved, `[x_1, y_1, ..., x_C, y_C, x_q]`;
  logits read at the exemplar positions (the query last).

  Parameters it makes: `embed_x` (a Dense of the exemplars, with bias) and
  `embed_y` (label embeddings, a normal truncated at +-2 sigma with sigma
  0.02, drawn per label so padding a run's labels does not change them).

  Attributes:
    context_len: C pairs, so T = 2C + 1 tokens.
    input_dim: D, exemplar dimension.
    num_labels: label capacity L (outputs and label embeddings).
  """
  context_len: int
  input_dim: int
  num_labels: int
  output_embedding: tuple[str, str] = ("embed_y", "embedding")  # labels as inputs

  @property
  def seq_len(self) -> int:
    return 2 * self.context_len + 1

  @property
  def num_outputs(self) -> int:
    return self.num_labels

  def embed(self, batch: Batch, d_model: int) -> jax.Array:
    """Token embeddings [B, T, d]; called inside the model's Flax scope.

    With `batch.table_rows` the exemplar embedding (linear) is computed on
    the R distinct rows and gathered: the same values up to float rounding,
    and half the embedding work or less when R < B (C+1) (the paper's task:
    50 rows against 96 tokens per batch of 32); `batch.inputs` is then not
    read.
    """
    inputs, labels, table_rows = batch.inputs, batch.labels, batch.table_rows
    b, n, _ = inputs.shape
    embed_x = nn.Dense(d_model, name="embed_x", kernel_init=nn.initializers.lecun_normal(),
                       bias_init=nn.initializers.zeros,
                       dot_general=model_core.dense_dot_general)
    if table_rows is None:
      ex = embed_x(inputs)  # [B, C+1, d]
    else:
      # [R, d] -> [B, C+1, d]; a gather whose gradient sums without atomics.
      ex = model_lib.take_rows(embed_x(table_rows.x), table_rows.index)
    lab = model_lib.Embed(self.num_labels, d_model, name="embed_y",
                          embedding_init=model_lib.per_output_init(0.02, 0, corrected=False)
                          )(labels[:, :-1])  # [B, C, d]
    pairs = jnp.stack([ex[:, :-1], lab], axis=2).reshape(b, 2 * (n - 1), d_model)
    return jnp.concatenate([pairs, ex[:, -1:]], axis=1)  # [B, T, d]

  def readout(self, final: jax.Array) -> jax.Array:
    """The exemplar positions 0, 2, ..., 2C of [B, T, d] (the query last)."""
    return final[:, 0::2]

  def output_mask(self, num_outputs: jax.Array) -> jax.Array:
    """[L] bool: labels below the run's label count."""
    return jnp.arange(self.num_labels) < num_outputs

  def dummy_batch(self) -> Batch:
    n = self.context_len + 1
    return Batch(inputs=jnp.zeros((1, n, self.input_dim), jnp.float32),
                 labels=jnp.zeros((1, n), jnp.int32), classes=jnp.zeros((1, n), jnp.int32))

  @property
  def layout(self) -> base.Layout:
    t = self.seq_len
    labels = tuple(range(1, t - 1, 2))
    # The paper's layer-1 clamp: each label token holds its exemplar, the
    # first exemplar and the query keep their own.
    source = (0,) + tuple(range(0, t - 2)) + (t - 1,)
    return base.Layout(task=FewShot.name, seq_len=t, readout=tuple(range(0, t, 2)),
                       prev_rows=labels, induction_rows=(t - 1,), label_positions=labels,
                       layer1_source=source)

  def token_labels(self, batch: Batch) -> np.ndarray:
    """[B, T] str: what each position holds, for figures: `x1 y1 x2 y2 ... q`,
    each label token with its label id (`y1=3`)."""
    labels = np.asarray(batch.labels)
    b, c = labels.shape[0], self.context_len
    out = np.empty((b, self.seq_len), object)
    for i in range(c):
      out[:, 2 * i] = f"x{i + 1}"
      out[:, 2 * i + 1] = [f"y{i + 1}={y}" for y in labels[:, i]]
    out[:, -1] = "q"
    return out.astype(str)

  def targets(self, batch: Batch) -> base.Targets:
    """The query's reference targets: the label tokens after exemplars of its class.

    Only the query's row is an induction row; its support is the label
    tokens, its contrast the label tokens after other classes, and the match
    similarity of label token 2i+1 the cosine of exemplar i and the query.
    """
    classes, x = batch.classes, batch.inputs
    b, n = classes.shape
    t = self.seq_len
    is_label = (np.arange(t) % 2 == 1) & (np.arange(t) < t - 1)  # [T]
    query_row = np.arange(t) == t - 1  # [T]
    same = classes[:, :-1] == classes[:, -1:]  # [B, C]
    on_labels = lambda v, fill: jnp.full((b, t), fill, v.dtype).at[:, 1:t - 1:2].set(v)
    target_key = on_labels(same, False)  # [B, T] over keys
    row = query_row[None, :, None]  # [1, T(row), 1]
    induction = row & target_key[:, None, :]
    support = jnp.broadcast_to(row & is_label[None, None, :], (b, t, t))
    xn = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
    sims = jnp.einsum("bcd,bd->bc", xn[:, :-1], xn[:, -1])  # [B, C] cosine similarity
    match = jnp.where(row, on_labels(sims, 0.0)[:, None, :], 0.0)
    key_outputs = on_labels(batch.labels[:, :-1], -1)
    return base.Targets(induction=induction, contrast=support & ~induction, support=support,
                        rows=jnp.broadcast_to(jnp.asarray(query_row)[None], (b, t)),
                        match_sim=match, key_outputs=key_outputs)


# --------------------------------------------------------------------------
# The task's static spec of a group, and its host-side definition.


@dataclasses.dataclass(frozen=True)
class FewShotSpec(base.TaskSpec):
  """The few-shot task in one compile group (hashable).

  Attributes:
    front: the front end.
    train_seq: the training stream's sampler spec.
    evals: (evaluator, sampler spec) of every evaluator of the task.
    evaluators: the evaluators this group runs, in config order.
  """
  front: FewShotFront
  train_seq: SeqSpec
  evals: tuple[tuple[str, SeqSpec], ...]
  evaluators: tuple[str, ...]
  name: str = "fewshot"
  head_score_evaluators: tuple[str, ...] = ("fsl_train",)  # per-head scores: fsl_train only
  analysis_evaluator: str = "fsl_train"
  induction_metric: str = "induction_strength"

  def sample(self, key, shared, props, stream, size, first_index=0):
    spec = self.train_seq if stream == "train" else dict(self.evals)[stream]
    return sample_batch(key, shared, props, spec, size, first_index)

  def loss(self, logits, batch):
    """Mean query cross-entropy of a batch."""
    return jnp.mean(query_xent(logits[:, -1], batch.labels[:, -1]))

  def eval_terms(self, evaluator, logits, acts, batch):
    terms = per_sequence(logits, batch.labels)
    if evaluator in self.head_score_evaluators:
      last = acts[f"layer_{_num_layers(acts) - 1}"]["attn"]["pattern"]
      sums, counts = scores.induction_rows(last, self.front.targets(batch))
      terms["induction"] = sums / counts[:, None]  # one row (the query) per sequence
      terms["prev_token"] = scores.prev_token(acts["layer_0"]["attn"]["pattern"],
                                              self.front.layout)
    return terms

  def reduce(self, evaluator, terms):
    result = reduce_sequences(terms)
    if "induction" in terms:
      for h in range(terms["induction"].shape[1]):
        result[f"induction_strength.h{h}"] = jnp.mean(terms["induction"][:, h])
        result[f"prev_token.h{h}"] = jnp.mean(terms["prev_token"][:, h])
    return result

  def evaluator_index(self, evaluator):
    return EVALUATORS.index(evaluator)


def _num_layers(acts: dict) -> int:
  return sum(1 for k in acts if k.startswith("layer_"))


REST_MODES = ("distractor", "iid", "unique")
TEST_CLASS_EXEMPLARS = ("train", "all")
DATA_SOURCES = ("gaussian", "file")


def distinct_classes_per_sequence(d) -> int:
  """How many different classes one sequence can hold (query included), from `cfg.data`."""
  rest_slots = d.context_len - d.burstiness
  if rest_slots <= 0:
    return 1
  if d.rest == "distractor":
    return 2
  return 1 + rest_slots


def _require(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(field, message)


def _finite(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class FewShot(base.Task):
  """The host-side definition of the few-shot task (`task.name=fewshot`, fields `data.*`)."""
  name = "fewshot"
  group = "data"
  per_run_fields = ("data.num_train_classes", "data.num_labels", "data.burstiness",
                    "data.zipf_alpha", "data.noise", "data.label_holdout")
  # Padded to the group's largest value (noise: any noisy run turns noise on).
  capacity_fields = ("data.num_train_classes", "data.num_labels", "data.noise")
  evaluators = EVALUATORS
  default_evaluators = EVALUATORS
  headline = "fsl_train/loss"
  default_curves = ("fsl_train/loss", "fsl_train/induction_strength")
  induction_metric = "induction_strength"
  # Two labels in context: the plateau at chance, and the loss at which the
  # task counts as solved (Singh et al. 2024), the default timing threshold.
  references = {"loss": (("ln 2", math.log(2.0)), ("0.4 ln 2", 0.4 * math.log(2.0)))}

  def fields(self) -> ml_collections.ConfigDict:
    """The paper's main run (Sec. 2) as the defaults of `data.*`."""
    d = ml_collections.ConfigDict()
    d.source = "gaussian"
    d.path = ""  # data.source == 'file': .h5, .npy or .npz of [classes, exemplars, dim]
    d.dataset_key = "resnet18/224/feat"  # key inside an .h5 / .npz file
    d.dim = 512  # gaussian source: input dimension D
    d.exemplar_noise = 0.1  # gaussian source: exemplar = mean + eps * N(0, I/D)
    d.table_seed = 0  # gaussian source: seed of the class table (shared by all runs)
    d.num_train_classes = 50
    d.num_test_classes = 100
    d.num_train_exemplars = 1  # exemplars per class used in training ...
    d.num_exemplars = 5  # ... of this many; the rest are held out (fsl_train_valex)
    d.num_labels = 5
    d.context_len = 2  # exemplar-label pairs before the query
    d.burstiness = 1  # copies of the query's class in the context
    d.rest = "distractor"  # other context slots: one distractor class | iid | unique classes
    d.zipf_alpha = 0.0  # class frequencies p(k) ~ (k+1)^-alpha over training classes
    d.noise = 0.0  # per-token Gaussian input noise, std noise/sqrt(D) per coordinate
    d.relabel = True  # per-sequence relabelling (few-shot); False: label = class mod num_labels
    d.label_holdout = 0.2  # share of label pairs held out for fsl_val_rl (paper: 2 of 10)
    # Exemplars fsl_test_class draws from its held-out classes: 'train' = the
    # training exemplar split, as the reference code ran it (its query is then
    # the very vector in the context; docs/fidelity.md); 'all' = every exemplar.
    d.test_class_exemplars = "train"
    return d

  def validate(self, cfg) -> None:
    d = cfg.data
    v = d.table_seed
    _require(isinstance(v, int) and 0 <= v < 2**31, "data.table_seed",
             f"must be an integer in [0, 2^31), got {v!r}")
    _require(d.source in DATA_SOURCES, "data.source",
             f"must be one of {DATA_SOURCES}, got {d.source!r}")
    if d.source == "file":
      _require(bool(d.path), "data.path", "data.source=file needs a path")
      _require(os.path.isfile(d.path), "data.path", f"no such file {d.path!r}")
    _require(d.dim >= 1, "data.dim", "must be >= 1")
    _require(_finite(d.exemplar_noise) and d.exemplar_noise >= 0,
             "data.exemplar_noise", "must be a finite number >= 0")
    _require(d.context_len >= 1, "data.context_len", "must be >= 1")
    _require(0 <= d.burstiness <= d.context_len, "data.burstiness",
             f"must be in [0, data.context_len={d.context_len}], got {d.burstiness}")
    _require(d.rest in REST_MODES, "data.rest",
             f"must be one of {REST_MODES}, got {d.rest!r}")
    _require(d.test_class_exemplars in TEST_CLASS_EXEMPLARS, "data.test_class_exemplars",
             f"must be one of {TEST_CLASS_EXEMPLARS}, got {d.test_class_exemplars!r}")
    _require(d.num_train_classes >= 1, "data.num_train_classes", "must be >= 1")
    _require(d.num_test_classes >= 0, "data.num_test_classes", "must be >= 0")
    _require(1 <= d.num_train_exemplars <= d.num_exemplars, "data.num_train_exemplars",
             f"must be in [1, data.num_exemplars={d.num_exemplars}]")
    _require(d.num_labels >= 2, "data.num_labels", "must be >= 2")
    _require(d.num_labels <= d.num_train_classes, "data.num_labels",
             f"more labels ({d.num_labels}) than training classes "
             f"({d.num_train_classes})")
    k = distinct_classes_per_sequence(d)
    _require(k <= d.num_train_classes, "data.num_train_classes",
             f"a sequence holds {k} distinct classes but only "
             f"{d.num_train_classes} training classes exist")
    if d.relabel:
      _require(k <= d.num_labels, "data.num_labels",
               f"a sequence holds {k} distinct classes, so it needs >= {k} labels")
    _require(_finite(d.zipf_alpha) and d.zipf_alpha >= 0, "data.zipf_alpha",
             "must be a finite number >= 0")
    _require(_finite(d.noise) and d.noise >= 0, "data.noise", "must be a finite number >= 0")
    _require(_finite(d.label_holdout) and 0 <= d.label_holdout < 1, "data.label_holdout",
             "must be in [0, 1)")
    if d.label_holdout > 0:
      _require(d.relabel and k == 2, "data.label_holdout",
               "label-pair hold-out needs relabelled sequences of two classes "
               "(data.rest='distractor', data.burstiness < data.context_len); set it to 0")
      pairs = d.num_labels * (d.num_labels - 1) // 2
      held = int(round(d.label_holdout * pairs))
      _require(1 <= held < pairs, "data.label_holdout",
               f"holds out {held} of {pairs} label pairs; need at least one on each side")

  def validate_evaluators(self, cfg, names: Sequence[str]) -> None:
    """Checks that each evaluator has the data it needs."""
    d = cfg.data
    k = distinct_classes_per_sequence(d)
    if "fsl_test_class" in names:
      _require(d.num_test_classes >= k, "data.num_test_classes",
               f"fsl_test_class needs >= {k} test classes")
    if "fsl_val_rl" in names:
      _require(d.label_holdout > 0, "eval.evaluators",
               "fsl_val_rl needs data.label_holdout > 0")
    if "fsl_train_valex" in names:
      _require(d.num_exemplars > d.num_train_exemplars, "eval.evaluators",
               "fsl_train_valex needs held-out exemplars (data.num_exemplars > "
               "data.num_train_exemplars)")

  def front(self, cfg) -> FewShotFront:
    d = cfg.data
    return FewShotFront(context_len=d.context_len, input_dim=d.dim, num_labels=d.num_labels)

  def spec(self, cfg, batch_size, eval_batch, evaluators) -> FewShotSpec:
    d = cfg.data
    noise = d.noise > 0
    front = self.front(cfg)
    evals = tuple((n, seq_spec(cfg, n, d.num_train_classes, noise, eval_batch))
                  for n in EVALUATORS)
    return FewShotSpec(front=front,
                       train_seq=seq_spec(cfg, "train", d.num_train_classes, noise, batch_size),
                       evals=evals, evaluators=tuple(evaluators))

  def props(self, settings, cfg) -> DataProps:
    caps = (cfg.data.num_train_classes, cfg.data.num_labels)
    data = [make_data_props(s, *caps) for s in settings]
    return jax.tree.map(lambda *xs: np.stack(xs), *data)

  def shared(self, cfg) -> Table:
    return make_table(cfg, cfg.data.num_train_classes, cfg.data.num_labels)


TASK = FewShot()


# --------------------------------------------------------------------------
# Direct use of the model on this task's arrays (notebooks, tests).


def model_spec(num_layers: int, num_heads: int, d_model: int, num_labels: int, context_len: int,
               input_dim: int, **model_fields) -> model_lib.ModelSpec:
  """A `ModelSpec` of the few-shot task's model (other fields as `ModelSpec`'s)."""
  front = FewShotFront(context_len=context_len, input_dim=input_dim, num_labels=num_labels)
  return model_lib.ModelSpec(num_layers=num_layers, num_heads=num_heads, d_model=d_model,
                             front=front, **model_fields)


def apply(spec: model_lib.ModelSpec, params, inputs: jax.Array, labels: jax.Array,
          num_labels: jax.Array, clamps: dict | None = None,
          table_rows: TableRows | None = None) -> tuple[jax.Array, dict]:
  """`model.apply` on exemplars [B, C+1, D] and labels [B, C+1] (the query's not read).

  Returns:
    (logits [B, C+1, L] at exemplar positions, the activation tree).
  """
  classes = jnp.zeros(labels.shape, jnp.int32)  # not read by the forward pass
  batch = Batch(inputs=inputs, labels=labels, classes=classes, table_rows=table_rows)
  return model_lib.apply(spec, params, batch, num_labels, clamps)
