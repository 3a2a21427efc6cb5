"""The Python API (icldyn.api, docs/python_api.md): loading a workdir, runs, forward
passes against training, whole-grid forms, custom measures and clamps, studies by
name, errors, and the example script."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import icldyn
from icldyn.errors import ConfigError
from icldyn.store.checkpoints import CheckpointNotFound
from conftest import ROOT, tiny_config

import api_parts

# Two runs that differ in a per-run clamp (one compiled group): run 1 keeps only
# last-layer head 0, so its training forward pass carries clamps.
GRID = ["seeds.init=0,1", "clamp.keep_head=-1,0"]


class Recorder(icldyn.Callbacks):
  def __init__(self):
    self.events = []

  def on_evaluation(self, event):
    self.events.append(event)

  def on_checkpoint(self, event):
    self.events.append(event)

  def on_group_end(self, event):
    self.events.append(event)


class Broken:
  def on_evaluation(self, event):
    raise RuntimeError("the tracking server is down")


RECORDED = Recorder()


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
  """The module's workdir, trained with the callbacks the callback test reads."""
  cfg = tiny_config(**{"train.num_sequences": 320, "train.eval_every": 160,
                       "checkpoint.every": 160})
  return icldyn.train(cfg, str(tmp_path_factory.mktemp("api") / "wd"), grid=GRID, quiet=True,
                      callbacks=[Broken(), RECORDED])  # Broken is logged, training goes on


def cross_entropy(logits, labels):
  """Mean cross-entropy of the query row by hand (numpy; -inf logits are absent outputs)."""
  q = np.asarray(logits, np.float64)[:, -1]  # [B, L]
  top = q.max(-1, keepdims=True)
  lse = np.log(np.exp(q - top).sum(-1)) + top[:, 0]
  return float(np.mean(lse - q[np.arange(len(q)), labels]))


def test_load_gives_tables_runs_and_steps(wd):
  assert len(wd.runs) == 4 and list(wd.runs["run"]) == [0, 1, 2, 3]
  assert set(wd.metrics.columns) == {"step", "run", "evaluator", "metric", "value"}
  assert wd.steps == [160, 320]  # no checkpoint of the untrained model
  assert [r.index for r in wd] == [0, 1, 2, 3]
  assert {r.settings["clamp.keep_head"] for r in wd} == {-1, 0}
  with pytest.raises(FileNotFoundError, match="icldyn analyze --workdir"):
    _ = wd.summary


def test_run_forward_equals_the_training_evaluation(wd):
  """Run.forward on the run's own evaluation set gives the loss `icldyn train`
  logged for it (its evaluate program, compiled separately; under the run's
  training clamps for the clamped runs)."""
  size = wd.config.eval.size
  for run in wd:
    for step in (160, 320):
      batch = run.batch("fsl_train", size=size)
      logits, cache = run.forward(run.params(step), batch)
      logged = wd.logged("fsl_train", "loss").loc[(run.index, step), "value"]
      # float32 forward in both; the evaluation reduces in another order (chunks of
      # eval.batch under lax.map): a few ulps of a loss near 1.
      np.testing.assert_allclose(cross_entropy(logits, batch.labels[:, -1]), logged, rtol=2e-6)
      assert cache["logits"].shape == logits.shape
  clamped = wd.run(1)  # keep_head=0: the training clamps ablate heads 1.. of the last layer
  batch = clamped.batch(size=16)
  params = clamped.params(320)
  with_train, _ = clamped.forward(params, batch)
  without, _ = clamped.forward(params, batch, clamps=[])
  text, _ = clamped.forward(params, batch, clamps="ablate(layer=1, heads=[1])")
  assert not np.allclose(with_train, without)
  np.testing.assert_array_equal(with_train, text)  # the same clamp, as text


def test_cache_names_helpers_and_keep(wd):
  run = wd.run(0)
  params, batch = run.params(320), run.batch(size=8)
  _, cache = run.forward(params, batch)
  spec = run.spec
  t, h = spec.seq_len, spec.num_heads
  assert cache["layer_1/attn/pattern"].shape == (8, h, t, t)
  np.testing.assert_allclose(cache["layer_1/attn/pattern"].sum(-1), 1.0, rtol=1e-5)
  assert cache.stack("attn/pattern").shape == (2, 8, h, t, t)
  heads = cache.head_outputs(params, 1)
  np.testing.assert_allclose(heads.sum(-2), cache["layer_1/attn/out"], atol=1e-5)
  labels, parts = cache.resid_components(params)
  assert labels[0] == "embed" and len(labels) == 1 + 2 * h
  np.testing.assert_allclose(parts.sum(0), cache["layer_1/resid_post"], atol=1e-5)
  kept = run.forward(params, batch, names=["layer_1"])[1]
  assert kept.names() == [n for n in cache.names() if n.startswith("layer_1/")]
  with pytest.raises(KeyError, match="no activation 'layer_9'"):
    run.forward(params, batch, names=["layer_9"])


def test_whole_grid_forward_equals_per_run(wd):
  logits, cache = wd.forward(320, names=["attn/pattern"])
  batches = wd.batch()
  assert logits.shape[0] == 4 and cache["layer_0/attn/pattern"].shape[0] == 4
  for i, run in enumerate(wd):
    one = jax.tree.map(lambda x: x[i], batches)
    mine, c = run.forward(run.params(320), one, names=["attn/pattern"])
    # vmap batches the runs' matmuls into one program, which XLA CPU may round
    # differently from the single-run program: a few float32 ulps.
    np.testing.assert_allclose(logits[i], mine, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache["layer_1/attn/pattern"][i], c["layer_1/attn/pattern"],
                               atol=1e-6)
  shared, _ = wd.forward(320, jax.tree.map(lambda x: x[0], batches))  # one batch for all runs
  np.testing.assert_allclose(shared[0], logits[0], rtol=1e-5, atol=1e-5)


def test_batches_work_outside_jit_and_are_the_evaluation_set(wd):
  run = wd.run(0)
  a = run.batch("fsl_train", size=32)
  b = run.batch("fsl_train", size=8)
  np.testing.assert_array_equal(a.labels[:8], b.labels)  # a prefix of one fixed set
  c = run.batch("fsl_train", size=8, seed=7)
  assert not np.array_equal(c.inputs, b.inputs)
  t0, t1 = run.batch("train", step=0), run.batch("train", step=1)
  assert t0.labels.shape[0] == wd.config.train.batch_size
  assert not np.array_equal(t0.inputs, t1.inputs)
  with pytest.raises(ConfigError, match="did you mean fsl_train"):
    run.batch("fsl_trian")


def test_custom_measure_through_analyze_equals_by_hand(wd):
  out = icldyn.analyze(wd.path, measures=[api_parts.query_label_attention])
  assert "query_label_attention" in out["measures"]
  progress = wd.progress
  rows = progress[progress["measure"] == "query_label_attention"]
  assert len(rows) == 4 * 2 * 2 * wd.config.model.num_heads  # runs x checkpoints x layers x heads
  for run in wd:
    batch = run.batch(size=256)  # the analysis batch: first 256 of the headline evaluator's set
    for step in wd.steps:
      _, cache = run.forward(run.params(step), batch)
      pattern = np.asarray(cache["layer_1/attn/pattern"], np.float64)[:, :, -1, 1:-1:2]
      same = batch.classes[:, None, :-1] == batch.classes[:, None, -1:]
      by_hand = np.where(same, pattern, -pattern).sum(-1).mean(0)
      got = rows[(rows["run"] == run.index) & (rows["step"] == step) & (rows["layer"] == 1)]
      # analyze's program maps runs in chunks (lax.map over vmap): float32 ulps.
      np.testing.assert_allclose(got.sort_values("head")["value"], by_hand, atol=2e-6)
  timed = set(wd.phase_changes["curve"])
  assert any(c.startswith("progress/query_label_attention.l1.h") for c in timed)


@pytest.mark.slow  # two `icldyn analyze` processes: about 25 s; the in-process form stays
def test_custom_measure_by_module_path_on_the_command_line(wd, tmp_path):
  env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
  out = subprocess.run([sys.executable, "-m", "icldyn", "analyze", "--workdir", wd.path,
                        "--measures", "api_parts:query_label_attention", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "query_label_attention" in set(icldyn.load(wd.path).progress["measure"])
  bad = subprocess.run([sys.executable, "-m", "icldyn", "analyze", "--workdir", wd.path,
                        "--measures", "no_such_module:fn"], capture_output=True, text=True,
                       env=env, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "icldyn: error: --measures: cannot import 'no_such_module'")


def test_custom_python_clamp_trains_like_the_catalogue_clamp(tmp_path):
  """A user's prev-token clamp (api_parts.prev_token_by_hand) in training gives
  the run that the catalogue's prev_token gives."""
  common = {"train.num_sequences": 160, "train.eval_every": 160, "checkpoint.every": 160}
  mine = icldyn.train(tiny_config(**common, clamps="api_parts.prev_token_by_hand(layer=0, head=1)"),
                      str(tmp_path / "mine"), quiet=True)
  theirs = icldyn.train(tiny_config(**common, clamps="prev_token(layer=0, heads=[1])"),
                        str(tmp_path / "theirs"), quiet=True)
  a, b = mine.run(0).params(160), theirs.run(0).params(160)
  # Both programs select the same constant pattern with `where`; the masks differ
  # only in how they broadcast ([1, H, 1, 1] against [1, H, T, 1]).
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  assert mine.runs["clamps"][0] == "api_parts.prev_token_by_hand(head=1, layer=0)"
  run = mine.run(0)
  _, cache = run.forward(a, run.batch(size=4))
  t = run.spec.seq_len
  want = np.eye(t, k=-1)
  want[0, 0] = 1.0
  np.testing.assert_array_equal(cache["layer_0/attn/pattern"][:, 1], np.broadcast_to(want, (4, t, t)))


def test_custom_clamp_in_forward_as_a_function(wd):
  run = wd.run(0)
  params, batch = run.params(320), run.batch(size=4)
  clamp = icldyn.custom_clamp(api_parts.prev_token_by_hand, layer=0, head=0)
  mine, _ = run.forward(params, batch, clamps=[clamp])
  theirs, _ = run.forward(params, batch, clamps="prev_token(layer=0, heads=[0])")
  np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-6)


def test_clear_errors(wd, tmp_path):
  run = wd.run(0)
  with pytest.raises(CheckpointNotFound, match=r"no stream checkpoint at step 161; the nearest "
                                               r"are at 160, 320"):
    run.params(161)
  with pytest.raises(IndexError, match="run index 7 is out of range: .* has runs 0 to 3"):
    wd.run(7)
  (tmp_path / "notes").mkdir()
  with pytest.raises(ConfigError, match="has no config.json; is it an icldyn train workdir"):
    icldyn.load(tmp_path / "notes")
  with pytest.raises(ConfigError, match="no such directory"):
    icldyn.load(tmp_path / "absent")
  with pytest.raises(KeyError, match="did you mean loss"):
    wd.logged("fsl_train", "los")


def test_studies_by_name_and_list(tmp_path):
  by_name = icldyn.load_config("ih_paper:smoke")
  by_path = icldyn.load_config(os.path.join(ROOT, "experiments", "ih_paper.py:smoke"))
  assert by_name.to_json() == by_path.to_json()
  with pytest.raises(ConfigError, match="did you mean ih_paper"):
    icldyn.load_config("ih_papr")
  # Outside the clone: the bundled study is found by name from any directory.
  out = subprocess.run([sys.executable, "-c", "import icldyn; "
                        "print(icldyn.load_config('repeat_tokens:smoke').task.name)"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert out.stdout.strip() == "repeat_tokens", out.stderr[-2000:]
  out = subprocess.run([sys.executable, "-m", "icldyn", "list"], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0
  for name in icldyn.list_studies():
    assert re.search(rf"^{name}: \S", out.stdout, re.M), name
  assert "--config ih_paper:smoke" in out.stdout


def test_import_is_light_and_names_are_documented():
  out = subprocess.run([sys.executable, "-c", "import sys, icldyn; "
                        "print('jax' in sys.modules, sorted(icldyn.__all__))"],
                       capture_output=True, text=True, timeout=120)
  assert out.stdout.startswith("False"), out.stdout + out.stderr
  doc = open(os.path.join(ROOT, "docs", "python_api.md")).read()
  for name in icldyn.__all__:
    assert f"icldyn.{name}" in doc, name
  with pytest.raises(AttributeError, match="public names are"):
    icldyn.checkpoint  # noqa: B018


def test_the_example_runs_in_15_lines_without_private_names(wd):
  path = os.path.join(ROOT, "examples", "analysis.py")
  src = open(path).read()
  code = src.split('"""', 2)[2]
  lines = [l for l in code.splitlines() if l.strip() and not l.startswith(("import", "from"))]
  assert len(lines) <= 15, len(lines)
  assert not re.search(r"(?<![\w'\"])_\w", code)  # no private names
  out = subprocess.run([sys.executable, path, wd.path], capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "WARNING" not in out.stderr  # loading is quiet: no absl line per restore
  worst = float(re.search(r"induction_strength: (\S+)", out.stdout).group(1))
  # The logged score is the same forward pass in training's evaluate program: float32 ulps.
  assert worst < 1e-5
  assert os.path.getsize(os.path.join(wd.path, "example_induction.png")) > 10_000



def test_callbacks_see_what_the_workdir_holds(wd):
  kinds = [(e.kind, e.step) for e in RECORDED.events]
  assert kinds == [("evaluation", 0), ("evaluation", 160), ("checkpoint", 160),
                   ("evaluation", 320), ("checkpoint", 320), ("group_end", 320)]
  metrics = wd.metrics
  for e in RECORDED.events:
    if e.kind != "evaluation":
      continue
    assert e.runs == (0, 1, 2, 3)
    for run, values in e.metrics.items():
      rows = metrics[(metrics.run == run) & (metrics.step == e.step)]
      written = {f"{a}/{b}": v for a, b, v in zip(rows.evaluator, rows.metric, rows.value)}
      assert values.keys() == written.keys()
      # metrics.csv holds 9 significant digits of the value the callback gets.
      np.testing.assert_allclose([values[k] for k in written], list(written.values()), rtol=1e-8)
  assert all(os.path.isdir(e.path) for e in RECORDED.events if e.kind == "checkpoint")
  assert RECORDED.events[-1].status == {r: ("done", -1) for r in range(4)}
