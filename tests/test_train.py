"""Grid training: equivalence to single runs, determinism, workdir outputs."""

import csv
import json
import os

import jax
import numpy as np
import pytest

from icldyn.store import checkpoints as ckpt_lib
from icldyn import runner
from conftest import run_python, tiny_config

AXES = ["seeds.init=0,1", "data.num_labels=5,6"]
FINAL = 640  # tiny_config: 640 sequences


def _train(path, cfg=None, axes=AXES):
  runner.train(cfg or tiny_config(), str(path), axes, quiet=True)
  return path


def _metrics(path):
  with open(os.path.join(path, "metrics.csv")) as f:
    return {(r["step"], r["run"], r["evaluator"], r["metric"]): float(r["value"])
            for r in csv.DictReader(f)}


def _final_params(path, run, group_index=None):
  rows = list(csv.DictReader(open(os.path.join(path, "runs.csv"))))
  row = rows[run]
  p = ckpt_lib.restore_run(str(path), FINAL, int(row["group"]), int(row["group_index"]))
  return jax.tree.map(np.asarray, p)


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
  return _train(tmp_path_factory.mktemp("grid"))


def test_workdir_outputs(grid_dir):
  names = set(os.listdir(grid_dir))
  assert {"config.json", "runs.csv", "metrics.csv", "checkpoints", "tb"} <= names
  cfg = json.load(open(grid_dir / "config.json"))
  assert cfg["grid"] == AXES and cfg["config"]["model"]["d_model"] == 16
  runs = list(csv.DictReader(open(grid_dir / "runs.csv")))
  assert [(r["seeds.init"], r["data.num_labels"]) for r in runs] == [
      ("0", "5"), ("0", "6"), ("1", "5"), ("1", "6")]
  assert all(r["status"] == "done" for r in runs)
  m = _metrics(grid_dir)
  evaluators = {k[2] for k in m}
  assert evaluators == {"train", "fsl_train", "fsl_val_rl", "fsl_train_valex", "fsl_test_class"}
  metrics = {k[3] for k in m if k[2] == "fsl_val_rl"}
  assert metrics == {"loss", "acc", "acc_in_context", "acc_out_context", "p_correct",
                     "p_correct_in_context", "p_in_context"}
  assert {k[3] for k in m if k[2] == "train"} == {"loss", "grad_norm"}
  steps = sorted({int(k[0]) for k in m})
  assert steps == [0, 160, 320, 480, 640]  # eval_every 160 sequences, batch 16
  stream = [s for s, _ in ckpt_lib.stream(str(grid_dir))]
  assert stream == [320, 640]
  assert sorted(os.listdir(grid_dir / "tb")) == [f"run_{i}" for i in range(4)]
  # Metrics are finite where defined; accuracies and probabilities lie in [0, 1].
  assert all(np.isfinite(v) for k, v in m.items() if k[3] != "acc_out_context")
  assert all(0 <= v <= 1 for k, v in m.items() if k[3].startswith(("acc", "p_")) and v == v)


def test_each_run_equals_that_run_trained_alone(grid_dir, tmp_path):
  m_grid = _metrics(grid_dir)
  for seed, labels in [(0, 5), (1, 6)]:
    idx = {(0, 5): 0, (1, 6): 3}[(seed, labels)]
    alone = _train(tmp_path / f"alone{idx}", axes=[f"seeds.init={seed}", f"data.num_labels={labels}"])
    m_alone = _metrics(alone)
    keys = [k for k in m_alone]
    a = np.array([m_alone[k] for k in keys])
    g = np.array([m_grid[(k[0], str(idx), k[2], k[3])] for k in keys])
    # XLA's CPU code may vectorise a different run count differently, which
    # changes float rounding in the last bits (measured <= 3e-8 relative on
    # parameters); 1e-6 relative is the documented bound.
    np.testing.assert_allclose(a, g, rtol=1e-6, atol=1e-6, equal_nan=True)
    pa, pg = _final_params(alone, 0), _final_params(grid_dir, idx)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pg)):
      sl = tuple(slice(0, s) for s in x.shape)  # the grid pads labels to 6
      # Norm-wise relative difference per parameter array.
      assert np.linalg.norm(x - y[sl]) <= 1e-6 * np.linalg.norm(x)


def test_position_in_the_grid_is_bitwise_irrelevant(grid_dir, tmp_path):
  rev = _train(tmp_path / "rev", axes=["seeds.init=1,0", "data.num_labels=6,5"])
  m, r = _metrics(grid_dir), _metrics(rev)
  mapping = {0: 3, 1: 2, 2: 1, 3: 0}
  for k, v in m.items():
    w = r[(k[0], str(mapping[int(k[1])]), k[2], k[3])]
    assert v == w or (np.isnan(v) and np.isnan(w))
  for run in range(4):
    for x, y in zip(jax.tree.leaves(_final_params(grid_dir, run)),
                    jax.tree.leaves(_final_params(rev, mapping[run]))):
      np.testing.assert_array_equal(x, y)


def test_same_command_twice_gives_identical_metrics(grid_dir, tmp_path):
  again = _train(tmp_path / "again")
  assert open(grid_dir / "metrics.csv").read() == open(again / "metrics.csv").read()


def test_eval_frequency_does_not_change_the_trajectory(grid_dir, tmp_path):
  cfg = tiny_config(**{"train.eval_every": 320})
  other = _train(tmp_path / "eval320", cfg)
  m, o = _metrics(grid_dir), _metrics(other)
  for k, v in o.items():
    if k[2] != "train":  # the training-loss mean spans a different window
      assert v == m[k] or (np.isnan(v) and np.isnan(m[k]))
  for run in range(4):
    for x, y in zip(jax.tree.leaves(_final_params(grid_dir, run)),
                    jax.tree.leaves(_final_params(other, run))):
      np.testing.assert_array_equal(x, y)


def test_four_devices_match_one(grid_dir, tmp_path):
  out = tmp_path / "dev4"
  code = f"""
import sys; sys.path.insert(0, 'tests')
import jax; assert jax.device_count() == 4
from conftest import tiny_config
from icldyn import runner
runner.train(tiny_config(), {str(out)!r}, {AXES!r}, quiet=True)
"""
  run_python(code, devices=4)
  m, d = _metrics(grid_dir), _metrics(out)
  assert m.keys() == d.keys()
  a = np.array([m[k] for k in m])
  b = np.array([d[k] for k in m])
  # One run per device is a different vectorisation width (see above).
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_tensorboard_tags_are_legal_and_otherwise_unchanged():
  from icldyn.store import files as workdir
  assert workdir.tensorboard_tag("fsl_train@keep_head_3/loss") == "fsl_train_keep_head_3/loss"
  for tag in ("fsl_train/induction_strength.h7", "train/grad_norm", "fsl_val_rl/acc"):
    assert workdir.tensorboard_tag(tag) == tag
