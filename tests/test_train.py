"""Grid training: equivalence to single runs, determinism, workdir outputs."""

import csv
import json
import os

import jax
import numpy as np
import pytest

from icldyn.store import checkpoints as ckpt_lib
from icldyn import runner
from conftest import run_python, tensorboard_run_dir, tensorboard_view, tiny_config

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
  # TensorBoard names each run by the settings the grid varies (AXES).
  assert sorted(os.listdir(grid_dir / "tb")) == [
      "run_0,init=0,num_labels=5", "run_1,init=0,num_labels=6", "run_2,init=1,num_labels=5",
      "run_3,init=1,num_labels=6"]
  # Metrics are finite where defined; accuracies and probabilities lie in [0, 1].
  assert all(np.isfinite(v) for k, v in m.items() if k[3] != "acc_out_context")
  assert all(0 <= v <= 1 for k, v in m.items() if k[3].startswith(("acc", "p_")) and v == v)


def test_each_run_equals_that_run_trained_alone(grid_dir, tmp_path):
  # Run 0 (seed 0, 5 labels) differs from the grid's program in both ways a run
  # can: its label count is padded to 6 in the grid, and the grid vmaps 4 runs.
  # (Another run alone would cost a compile and test neither anything else: the
  # run count alone is also covered by test_four_devices_match_one, 1 run per
  # device, and by tests/test_reliability.py's grid without its diverged run.)
  m_grid = _metrics(grid_dir)
  for seed, labels in [(0, 5)]:
    idx = 0
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


def _resume_states(path):
  store = ckpt_lib.Store(str(path), 0, read_only=True)
  try:
    return {s: store.resume.restore(s) for s in store.resume_steps()}
  finally:
    store.close()


def test_running_ahead_changes_no_bit(grid_dir, tmp_path, monkeypatch):
  """The loop sends chunk k+1 before it reads chunk k (icldyn.runner); the loop that
  waits (ICLDYN_RUN_AHEAD=0), with chunks of 3 steps (most ending between events,
  so the sums of several chunks meet at each evaluation), writes the same bytes."""
  monkeypatch.setenv(runner.RUN_AHEAD_ENV, "0")
  waited = _train(tmp_path / "waited", tiny_config(train__scan_steps=3))  # 4 chunks per evaluation
  for name in ("metrics.csv", "runs.csv"):
    assert (waited / name).read_bytes() == (grid_dir / name).read_bytes(), name
  a, b = list(ckpt_lib.stream(str(waited))), list(ckpt_lib.stream(str(grid_dir)))
  assert [s for s, _ in a] == [s for s, _ in b] == [320, 640]
  for (_, x), (_, y) in zip(a, b):
    jax.tree.map(np.testing.assert_array_equal, x, y)
  x, y = _resume_states(waited), _resume_states(grid_dir)
  assert sorted(x) == sorted(y) == [320, 640]
  jax.tree.map(np.testing.assert_array_equal, x, y)


@pytest.mark.slow  # a 4-device subprocess: about a minute on 2 cores (tests/test_distributed.py covers devices across processes)
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


def test_tensorboard_scalars_equal_metrics_csv(grid_dir):
  """What TensorBoard shows (event files parsed with tensorboardX's protobufs)
  is metrics.csv: the same tags, steps and values (float32, as TensorBoard
  stores them), for every run; values that are not finite (acc_out_context
  when no query label is out of context) are left out of TensorBoard."""
  from icldyn.store import files as workdir
  m = _metrics(grid_dir)
  for run in range(4):
    want = {}
    for (step, r, ev, metric), v in sorted(m.items(), key=lambda kv: int(kv[0][0])):
      if r == str(run) and np.isfinite(v):
        want.setdefault(workdir.tensorboard_tag(f"{ev}/{metric}"), []).append(
            (int(step), np.float32(v)))
    got = tensorboard_view(tensorboard_run_dir(grid_dir, run))
    assert want and got.keys() == want.keys()
    for tag, points in want.items():
      g = got[tag]
      assert [s for s, _ in g] == [s for s, _ in points], tag
      # metrics.csv holds 9 significant digits of the host value (a float64
      # mean for `train`), TensorBoard its float32: rounding twice may differ
      # by one unit in the last place, never more.
      np.testing.assert_array_max_ulp(np.array([v for _, v in g], np.float32),
                                      np.array([v for _, v in points], np.float32), maxulp=1)


def test_tensorboard_shows_each_runs_settings_and_the_config(grid_dir):
  """HParams: each run's settings as runs.csv has them (typed), with the task's
  headline metric; the text plugin: the resolved config of config.json."""
  from tensorboardX.proto.event_pb2 import Event
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
  from conftest import event_records
  runs = {r["run"]: r for r in csv.DictReader(open(grid_dir / "runs.csv"))}
  config = json.load(open(grid_dir / "config.json"))
  for run in range(4):
    start, texts = None, []
    d = tensorboard_run_dir(grid_dir, run)
    for name in sorted(os.listdir(d)):
      for rec in event_records(os.path.join(d, name)):
        for v in Event.FromString(rec).summary.value:
          if v.tag == "_hparams_/session_start_info":
            start = HParamsPluginData.FromString(v.metadata.plugin_data.content).session_start_info
          if v.metadata.plugin_data.plugin_name == "text":
            texts.append(b"".join(v.tensor.string_val).decode())
    hp = {k: (x.number_value if x.HasField("number_value") else x.string_value)
          for k, x in start.hparams.items()}
    assert hp["seeds.init"] == float(runs[str(run)]["seeds.init"])
    assert hp["data.num_labels"] == float(runs[str(run)]["data.num_labels"])
    assert hp["clamps"] == runs[str(run)]["clamps"]
    assert json.loads(texts[0].strip("`\n")) == config


def test_tensorboard_tags_are_legal_and_otherwise_unchanged():
  from icldyn.store import files as workdir
  assert workdir.tensorboard_tag("fsl_train@keep_head_3/loss") == "fsl_train_keep_head_3/loss"
  for tag in ("fsl_train/induction_strength.h7", "train/grad_norm", "fsl_val_rl/acc"):
    assert workdir.tensorboard_tag(tag) == tag
