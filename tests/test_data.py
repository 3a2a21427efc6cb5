"""Samplers: statistics on large samples, padding independence, sources."""

import collections
import math

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icldyn.tasks import fewshot as data_lib
from icldyn.config import ConfigError
from conftest import tiny_config

N = 4000  # sequences per statistical test


def _sample(cfg, evaluator="train", n=N, cap_classes=None, cap_labels=None, seed=0, settings=None):
  cap_classes = cap_classes or cfg.data.num_train_classes
  cap_labels = cap_labels or cfg.data.num_labels
  run = {"data.num_train_classes": cfg.data.num_train_classes, "data.zipf_alpha": cfg.data.zipf_alpha,
         "data.num_labels": cfg.data.num_labels, "data.label_holdout": cfg.data.label_holdout,
         "seeds.data": seed, "data.burstiness": cfg.data.burstiness, "data.noise": cfg.data.noise}
  run.update(settings or {})
  props = jax.tree.map(jnp.asarray, data_lib.make_data_props(run, cap_classes, cap_labels))
  with cfg.unlocked():
    cfg.data.num_train_classes = cap_classes
  table = jax.tree.map(jnp.asarray, data_lib.make_table(cfg, cap_classes, cap_labels))
  spec = data_lib.seq_spec(cfg, evaluator, cap_classes, cfg.data.noise > 0)
  f = jax.jit(lambda k: data_lib.sample_batch(k, table, props, spec, n))
  return jax.tree.map(np.asarray, f(jax.random.PRNGKey(seed))), table


def test_paper_format_query_once_one_distractor():
  b, _ = _sample(tiny_config())
  ctx, q = b.classes[:, :-1], b.classes[:, -1]
  assert np.all(np.sum(ctx == q[:, None], axis=1) == 1)
  # The distractors are training classes of the run, and every one of them occurs.
  assert set(np.unique(ctx[ctx != q[:, None]])) == set(range(12))
  # The query's label equals the label of its context copy; the distractor's differs.
  same = ctx == q[:, None]
  assert np.all(b.labels[:, :-1][same] == b.labels[:, -1])
  assert np.all(b.labels[:, :-1][~same] != b.labels[:, -1].repeat(1))
  assert b.labels.max() < 5


@pytest.mark.parametrize("burst", [0, 1, 2, 3])
def test_burstiness_counts(burst):
  cfg = tiny_config(**{"data.context_len": 4, "data.burstiness": burst})
  b, _ = _sample(cfg, n=500)
  count = np.sum(b.classes[:, :-1] == b.classes[:, -1:], axis=1)
  assert np.all(count == burst)
  # The rest is one distractor class (data.rest='distractor').
  rest = np.where(b.classes[:, :-1] == b.classes[:, -1:], -1, b.classes[:, :-1])
  for row in rest:
    assert len(set(row[row >= 0])) <= 1


def test_query_slot_position_is_uniform():
  b, _ = _sample(tiny_config())
  first = np.mean(b.classes[:, 0] == b.classes[:, -1])
  # Binomial(4000, 1/2): std 0.0079; 4 sigma.
  assert abs(first - 0.5) < 0.032


def test_zipf_class_frequencies():
  cfg = tiny_config(**{"data.zipf_alpha": 1.0, "data.num_train_classes": 10})
  b, _ = _sample(cfg, n=20000)
  counts = np.bincount(b.classes[:, -1], minlength=10)
  p = (np.arange(1, 11) ** -1.0)
  p /= p.sum()
  # Each count ~ Binomial(20000, p_k): 4.5-sigma bound per class (10 classes, family error < 1e-4).
  sigma = np.sqrt(20000 * p * (1 - p))
  assert np.all(np.abs(counts - 20000 * p) < 4.5 * sigma)


def test_uniform_classes_cover_only_the_runs_classes():
  cfg = tiny_config(**{"data.num_train_classes": 7})
  b, _ = _sample(cfg, cap_classes=12, n=3000)
  assert b.classes.max() < 7
  counts = np.bincount(b.classes[:, -1], minlength=7)
  # Binomial(3000, 1/7): std 19.2; 4.5 sigma per class.
  assert np.all(np.abs(counts - 3000 / 7) < 4.5 * math.sqrt(3000 / 7 * 6 / 7))


def test_label_pair_split():
  cfg = tiny_config()
  tr, _ = _sample(cfg, "fsl_train")
  va, _ = _sample(cfg, "fsl_val_rl")
  pairs = lambda b: {tuple(sorted(set(r.tolist()))) for r in b.labels[:, :-1]}
  train_pairs, val_pairs = pairs(tr), pairs(va)
  assert len(train_pairs) == 8 and len(val_pairs) == 2  # 10 pairs of 5 labels, 20% held out
  assert not train_pairs & val_pairs
  # Both orders of assignment occur (the query label is each member of a pair).
  assert len({int(l) for l in tr.labels[:, -1]}) == 5


def test_padding_does_not_change_a_runs_draws():
  cfg = tiny_config()
  small, _ = _sample(cfg, n=64)
  big, _ = _sample(tiny_config(), n=64, cap_classes=20, cap_labels=9)
  np.testing.assert_array_equal(small.classes, big.classes)
  np.testing.assert_array_equal(small.labels, big.labels)
  np.testing.assert_array_equal(small.inputs, big.inputs)


def test_heldout_exemplars_and_test_classes():
  cfg = tiny_config(**{"data.num_exemplars": 5, "data.num_train_exemplars": 1})
  tr, table = _sample(cfg, "fsl_train", n=200)
  vx, _ = _sample(cfg, "fsl_train_valex", n=200)
  tc, _ = _sample(cfg, "fsl_test_class", n=200)
  x = np.asarray(table.x)
  assert np.allclose(tr.inputs, x[tr.classes, 0])  # only exemplar 0 in training
  assert not np.any(np.all(np.isclose(vx.inputs[:, :, None], x[vx.classes][:, :, :1]), -1))
  assert tc.classes.min() >= 12 and tc.classes.max() < 18  # test rows follow the 12 train rows


def test_noise_statistics():
  cfg = tiny_config(**{"data.noise": 0.5, "data.dim": 64})
  b, table = _sample(cfg, n=2000)
  clean = np.asarray(table.x)[b.classes, 0]
  eps = (b.inputs - clean) * np.sqrt(64) / 0.5
  # 2000 * 3 * 64 standard normals: the std estimate is within 1% (its sd is ~0.2%).
  assert abs(eps.std() - 1.0) < 0.01 and abs(eps.mean()) < 0.01


def test_gaussian_table_per_class_stable():
  a = data_lib.gaussian_table(3, np.array([0, 1, 2]), 2, 8, 0.1)
  b = data_lib.gaussian_table(3, np.array([2, 0]), 2, 8, 0.1)
  np.testing.assert_array_equal(a[[2, 0]], b)
  # Class means ~ N(0, I/D): squared norm ~ 1.
  big = data_lib.gaussian_table(0, np.arange(400), 1, 64, 0.0)
  assert abs(np.mean(np.sum(big[:, 0] ** 2, -1)) - 1.0) < 0.05


def test_file_sources(tmp_path):
  arr = np.random.default_rng(0).normal(size=(30, 5, 16)).astype(np.float32)
  h5 = tmp_path / "feat.h5"
  with h5py.File(h5, "w") as f:
    f.create_dataset("resnet18/224/feat", data=arr)
  np.save(tmp_path / "feat.npy", arr)
  for path in (h5, tmp_path / "feat.npy"):
    cfg = tiny_config(**{"data.source": "file", "data.path": str(path)})
    table = data_lib.make_table(cfg, 12, 5)
    np.testing.assert_array_equal(table.x[:12], arr[:12])
    np.testing.assert_array_equal(table.x[12:], arr[-6:])


@pytest.mark.parametrize("shape, field", [((30, 16), "data.path"), ((30, 5, 8), "data.dim"),
                                          ((10, 5, 16), "data.num_train_classes")])
def test_file_with_wrong_shape(tmp_path, shape, field):
  np.save(tmp_path / "bad.npy", np.zeros(shape, np.float32))
  cfg = tiny_config(**{"data.source": "file", "data.path": str(tmp_path / "bad.npy")})
  with pytest.raises(ConfigError) as e:
    data_lib.make_table(cfg, 12, 5)
  assert e.value.field == field


def test_file_with_nan(tmp_path):
  arr = np.zeros((30, 5, 16), np.float32)
  arr[3, 1, 2] = np.nan
  np.save(tmp_path / "nan.npy", arr)
  cfg = tiny_config(**{"data.source": "file", "data.path": str(tmp_path / "nan.npy")})
  with pytest.raises(ConfigError, match="NaN"):
    data_lib.make_table(cfg, 12, 5)


def test_mixture_picks_per_sequence():
  k = jax.random.PRNGKey(0)
  a = data_lib.Batch(jnp.zeros((1000, 3, 2)), jnp.zeros((1000, 3), jnp.int32), jnp.zeros((1000, 3), jnp.int32))
  b = data_lib.Batch(jnp.ones((1000, 3, 2)), jnp.ones((1000, 3), jnp.int32), jnp.ones((1000, 3), jnp.int32))
  m = data_lib.mixture(k, [a, b], jnp.array([0.25, 0.75]))
  frac = float(np.mean(np.asarray(m.labels[:, 0])))
  assert np.all(np.asarray(m.inputs[:, 0, 0]) == np.asarray(m.labels[:, 0]))
  assert abs(frac - 0.75) < 0.055  # Binomial(1000, .75): std .0137; 4 sigma


def _exemplar_index(batch, table, num_exemplars):
  """Which exemplar (of the class's row in the table) each input is: [B, C+1]."""
  x = np.asarray(table.x)[np.asarray(batch.classes)]  # [B, C+1, E, D]
  match = np.all(x[:, :, :num_exemplars] == np.asarray(batch.inputs)[:, :, None], axis=-1)
  assert np.all(match.sum(-1) == 1)  # every input is exactly one exemplar of its class
  return np.argmax(match, axis=-1)


def test_test_class_exemplars_train_is_the_reference_evaluator():
  # data.test_class_exemplars='train' (the default): fsl_test_class draws from the
  # training exemplar split, exemplar 0, as the reference code ran it, so in a
  # bursty sequence the query is the very vector that sits in the context.
  cfg = tiny_config()
  assert cfg.data.test_class_exemplars == "train" and cfg.data.burstiness == 1
  b, table = _sample(cfg, "fsl_test_class", n=500)
  assert np.all(b.classes >= cfg.data.num_train_classes)  # held-out classes
  ex = _exemplar_index(b, table, cfg.data.num_exemplars)
  assert np.all(ex == 0)
  same = b.classes[:, :-1] == b.classes[:, -1:]
  q = np.asarray(b.inputs)[:, -1]
  ctx = np.asarray(b.inputs)[:, :-1]
  assert np.all(np.all(ctx[same] == np.repeat(q, same.sum(1), axis=0), axis=-1))


def test_test_class_exemplars_all_draws_every_exemplar():
  # 'all': each slot's exemplar is uniform over the 5 exemplars. Over N slots the
  # count of exemplar e is Binomial(N, 1/5); 5 standard errors bound the share.
  cfg = tiny_config(data__test_class_exemplars="all")
  n = 2000
  b, table = _sample(cfg, "fsl_test_class", n=n)
  ex = _exemplar_index(b, table, cfg.data.num_exemplars).ravel()
  se = math.sqrt(0.2 * 0.8 / ex.size)
  for e in range(cfg.data.num_exemplars):
    assert abs(np.mean(ex == e) - 0.2) < 5 * se, (e, np.mean(ex == e))
  # The query equals its context exemplar only when both drew the same one: p = 1/5.
  same_class = b.classes[:, 0] == b.classes[:, -1]
  exq = _exemplar_index(b, table, cfg.data.num_exemplars)
  hit = np.mean(exq[same_class, 0] == exq[same_class, -1])
  se = math.sqrt(0.2 * 0.8 / same_class.sum())
  assert abs(hit - 0.2) < 5 * se, hit


def test_test_class_exemplars_leave_fsl_train_unchanged():
  # The field only changes what fsl_test_class evaluates: every other sampler's
  # sequences are bitwise the same under either value.
  for name in ("train", "fsl_train", "fsl_val_rl", "fsl_train_valex"):
    a, _ = _sample(tiny_config(), name, n=64)
    b, _ = _sample(tiny_config(data__test_class_exemplars="all"), name, n=64)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.labels, b.labels)


def _same_class_iff_same_label(b):
  same_class = b.classes[:, :, None] == b.classes[:, None, :]
  same_label = b.labels[:, :, None] == b.labels[:, None, :]
  return np.array_equal(same_class, same_label)


def test_rest_iid_draws_other_slots_independently():
  # data.rest='iid': each of the 3 other slots an independent class other than
  # the query's. P(two of 3 draws from 11 classes coincide) = 1 - 10*9/11^2 =
  # 0.256, so among 500 sequences some repeat (P(none) = 0.744^500 ~ 1e-64),
  # and a class-pair of slots coincides about 1/11 of the time.
  cfg = tiny_config(**{"data.rest": "iid", "data.context_len": 4, "data.label_holdout": 0.0})
  b, _ = _sample(cfg, n=500)
  ctx, q = b.classes[:, :-1], b.classes[:, -1:]
  assert np.all(np.sum(ctx == q, axis=1) == 1)  # burstiness 1
  rest = [row[row != qq] for row, qq in zip(ctx, q[:, 0])]
  repeats = np.mean([len(set(r)) < 3 for r in rest])
  # Binomial(500, 0.256): std 0.0195; 5 sigma.
  assert abs(repeats - 0.256) < 0.1
  # Relabelled per sequence: a class and its label go together within a sequence.
  assert _same_class_iff_same_label(b)


def test_rest_unique_and_no_relabelling():
  # data.rest='unique': the other slots hold distinct classes, none the query's;
  # data.relabel=False: every label is the class modulo num_labels, in every sequence.
  cfg = tiny_config(**{"data.rest": "unique", "data.context_len": 4, "data.relabel": False,
                       "data.label_holdout": 0.0})
  b, _ = _sample(cfg, n=500)
  ctx, q = b.classes[:, :-1], b.classes[:, -1:]
  assert np.all(np.sum(ctx == q, axis=1) == 1)
  assert all(len(set(row.tolist())) == 4 for row in ctx)
  np.testing.assert_array_equal(b.labels, b.classes % 5)
  # With 12 classes and 5 labels, classes 0 and 5 share label 0: not relabelled.
  assert not _same_class_iff_same_label(b)
