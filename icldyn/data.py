"""Data: class tables (Gaussian or from a file) and pure, jittable sequence samplers.

A sequence is `C` exemplar-label pairs and a query (Singh et al. 2024, arXiv
2404.07129, Sec. 2; after Chan et al. 2022): the query's class appears
`burstiness` times in the context, the other slots hold a distractor class
(or iid / unique other classes), and each sequence is relabelled to a random
pair of the run's `num_labels` labels, drawn from a train or held-out split of
the label pairs.

Determinism across grids. A run's draws must not depend on the grid it sits
in, although a grid pads per-run sizes (training classes, labels) to its
largest value. So every distribution whose support is a per-run size is
sampled by inverse CDF from a host-computed table (float64 cumsum, cast once),
whose first entries do not change with padding; the class table is generated
per class from `fold_in(table_key, class_id)`; label pairs are enumerated in a
canonical order that extends, not reshuffles, when the label count grows.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from icldyn.config import ConfigError

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


def _cdf(weights: np.ndarray, size: int) -> np.ndarray:
  """A float32 CDF of `weights` padded to `size` with 1.0 (weights in float64)."""
  w = np.asarray(weights, np.float64)
  out = np.ones(size, np.float64)
  if w.sum() > 0:
    c = np.cumsum(w) / w.sum()
    last = int(np.nonzero(w)[0][-1])
    c[last:] = 1.0  # exact 1.0 from the last supported entry on
    out[:len(c)] = c
  return out.astype(np.float32)


def class_cdf(num_classes: int, zipf_alpha: float, capacity: int) -> np.ndarray:
  """Zipf class CDF, p(k) proportional to (k+1)^-alpha for k < num_classes."""
  k = np.arange(num_classes, dtype=np.float64)
  return _cdf((k + 1.0) ** -float(zipf_alpha), capacity)


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
  return _cdf(train, len(a)), _cdf(held, len(a))


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
  test_cdf = _cdf(np.ones(d.num_test_classes), max(d.num_test_classes, 1))
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
      "fsl_test_class": ("test", (0, d.num_exemplars), "train"),
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


def _draw(cdf: jax.Array, u: jax.Array) -> jax.Array:
  """Inverse-CDF draw: the first index whose CDF exceeds u."""
  return jnp.minimum(jnp.sum(cdf <= u), cdf.shape[0] - 1).astype(jnp.int32)


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
  idx = _draw(cdf, v)
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

  q = _draw(cdf, jax.random.uniform(k_q))
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
    p = _draw(pair_cdf, jax.random.uniform(k_lab))
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
  idx = first_index + jnp.arange(size, dtype=jnp.uint32)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, idx)
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
