"""Tests for `icldyn analyze` and `icldyn densify` on one tiny trained workdir.

The workdir (4 runs: two init seeds x two learning rates, 640 sequences,
evaluations every 160, stream checkpoints at 320 and 640) is trained once
per module; tests that change a workdir work on a copy.
"""

import csv
import io
import math
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import tiny_config
from icldyn import cli
from icldyn import runner
from icldyn.store import checkpoints as ckpt_lib
from icldyn.store import files as wd_lib
from icldyn.analysis import command, densify, loader, measures
from icldyn.config import ConfigError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("an") / "wd")
  runner.train(tiny_config(), path, ["seeds.init=0,1", "train.learning_rate=1e-3,2e-3"],
               quiet=True)
  return path


def _copy(trained, tmp_path, name="wd"):
  dst = str(tmp_path / name)
  shutil.copytree(trained, dst)
  shutil.rmtree(os.path.join(dst, "analysis"), ignore_errors=True)
  return dst


def _read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _header(path):
  with open(path) as f:
    return f.readline().strip().split(",")


def test_analyze_writes_the_documented_files(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  out = io.StringIO()
  result = command.analyze(wd, measures="all", eval_size=32, out=out)
  a = os.path.join(wd, "analysis")
  assert _header(f"{a}/progress.csv") == list(command.PROGRESS_COLUMNS)
  runs = wd_lib.read_csv(os.path.join(wd, "runs.csv"))
  settings = [c for c in runs[0] if c not in loader.BOOKKEEPING]
  assert _header(f"{a}/phase_changes.csv") == ["run", *settings, *command.TIMING_COLUMNS]
  keys = [s for s in settings if not s.startswith("seeds.")]
  assert _header(f"{a}/summary.csv") == [*keys, *command.SUMMARY_COLUMNS]

  progress = _read(f"{a}/progress.csv")
  program = measures.make_program(loader.open_workdir(wd).prepared().groups[0].static,
                                  measures.MEASURES)
  per_run = measures.rows_per_run(program.layout)
  assert len(progress) == 4 * 2 * per_run  # runs x checkpoints x rows
  assert {int(r["step"]) for r in progress} == {320, 640}
  assert "loss@keep_head_1" in {r["measure"] for r in progress}
  assert result["checkpoints"] == 2 and "clamped" in result["measures"]
  pair = next(r for r in progress if r["measure"] == "k_composition")
  assert (pair["layer"], pair["layer2"]) == ("1", "0") and pair["head2"] != ""
  single = next(r for r in progress if r["measure"] == "ov_copying")
  assert (single["layer"], single["layer2"], single["head2"]) == ("1", "", "")

  # With the evaluation set's size, the checkpoint measures equal what
  # training logged for fsl_train at the same steps.
  metrics = loader.read_metrics(wd)
  for r in progress:
    name = {"induction_strength": f"induction_strength.h{r['head']}",
            "prev_token": f"prev_token.h{r['head']}", "loss": "loss",
            "acc": "acc"}.get(r["measure"])
    if name is None:
      continue
    c = metrics[("fsl_train", name)][int(r["run"])]
    logged = c.values[list(c.steps).index(int(r["step"]))]
    assert float(r["value"]) == pytest.approx(logged, rel=1e-4, abs=1e-6), r
  assert "Phase changes" in out.getvalue()


def test_default_analyze_reuses_logged_measures_and_groups_over_seeds(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  result = command.analyze(wd, quiet=True)
  assert result["measures"] == ["composition", "k_composition_svd_share", "ov_copying"]
  assert set(result["curves"]) == {"fsl_train/loss", "fsl_train/induction_strength.h0",
                                   "fsl_train/induction_strength.h1"}
  phases = _read(os.path.join(wd, "analysis", "phase_changes.csv"))
  assert len(phases) == 4 * 3 * 3  # runs x curves x estimators
  assert {p["crossed"] for p in phases} <= {"true", "false"}
  summary = _read(os.path.join(wd, "analysis", "summary.csv"))
  # Two learning rates, each over two seeds; threshold gives the midpoint only.
  loss = [s for s in summary if s["curve"] == "fsl_train/loss"]
  assert len(loss) == 2 * (1 + 3 + 3)
  assert {s["train.learning_rate"] for s in loss} == {"0.001", "0.002"}
  assert all(s["n_seeds"] == "2" for s in loss)
  assert {s["timing"] for s in loss if s["estimator"] == "threshold"} == {"midpoint"}


def _synthetic(trained, tmp_path, mids):
  """A copy whose metrics.csv holds fsl_train loss sigmoids with known crossings."""
  wd = _copy(trained, tmp_path, "syn")
  steps = np.arange(0, 200_001, 1000)
  rows = []
  for run, mid in mids.items():
    for s in steps:
      if mid is None:
        v = math.log(2)
      else:  # log-time sigmoid from ln 2 down to 0.05
        v = 0.05 + (math.log(2) - 0.05) / (1 + (max(s, 1) / mid) ** 6)
      rows.append((int(s), run, "fsl_train", "loss", v))
  with open(os.path.join(wd, "metrics.csv"), "w") as f:
    f.write("step,run,evaluator,metric,value\n")
    f.writelines(",".join(wd_lib.format_value(x) for x in r) + "\n" for r in rows)
  return wd


def test_phase_changes_of_known_sigmoids(trained, tmp_path):
  mids = {0: 20_000.0, 1: 50_000.0, 2: 80_000.0, 3: None}
  wd = _synthetic(trained, tmp_path, mids)
  command.analyze(wd, measures="", quiet=True)
  phases = _read(os.path.join(wd, "analysis", "phase_changes.csv"))
  level = 0.4 * math.log(2)
  for run, mid in mids.items():
    got = {p["estimator"]: p for p in phases if int(p["run"]) == run}
    assert set(got) == {"threshold", "logistic", "steepest"}
    if mid is None:
      assert all(p["crossed"] == "false" and p["midpoint"] == "nan" for p in got.values())
      continue
    # Where the sigmoid reaches the threshold, analytically.
    frac = (math.log(2) - 0.05) / (level - 0.05) - 1
    want = mid * frac ** (1 / 6)
    assert float(got["threshold"]["midpoint"]) == pytest.approx(want, rel=0.01)
    assert float(got["logistic"]["midpoint"]) == pytest.approx(mid, rel=0.03)
    assert float(got["steepest"]["midpoint"]) == pytest.approx(mid, rel=0.1)
    assert float(got["logistic"]["fit_r2"]) > 0.99
  summary = _read(os.path.join(wd, "analysis", "summary.csv"))
  th = [s for s in summary if s["estimator"] == "threshold"]
  # lr 1e-3 holds runs 0 and 2, lr 2e-3 runs 1 and 3 (3 never crossed).
  by_lr = {s["train.learning_rate"]: s for s in th}
  assert by_lr["0.001"]["n_crossed"] == "2" and by_lr["0.002"]["n_crossed"] == "1"
  assert float(by_lr["0.002"]["std"]) != float(by_lr["0.002"]["std"])  # nan: one value


def test_bad_inputs_fail_before_writing(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  for kwargs, field in [({"measures": "nope"}, "--measures"),
                        ({"curves": ["fsl_train"]}, "--curve"),
                        ({"curves": ["fsl_train/nope"]}, "--curve"),
                        ({"curves": ["fsl_train/loss:sideways"]}, "--curve"),
                        ({"curves": ["progress/ov_copying"], "measures": "composition"}, "--curve"),
                        ({"measures": "clamped", "clamps": ["keep_head_9"]}, "eval.clamps")]:
    with pytest.raises(ConfigError) as e:
      command.analyze(wd, quiet=True, **kwargs)
    assert e.value.field == field, kwargs
  assert not os.path.exists(os.path.join(wd, "analysis"))
  with pytest.raises(ConfigError, match="--workdir"):
    command.analyze(str(tmp_path / "missing"))


def test_cli_times_a_progress_curve(trained, tmp_path, capsys):
  wd = _copy(trained, tmp_path)
  code = cli.main(["analyze", "--workdir", wd, "--measures", "ov_copying",
                   "--curve", "progress/ov_copying.l1:up:0.0", "--curve", "fsl_train/acc"])
  assert code == 0
  phases = _read(os.path.join(wd, "analysis", "phase_changes.csv"))
  assert {p["curve"] for p in phases} == {"progress/ov_copying.l1.h0", "progress/ov_copying.l1.h1",
                                          "fsl_train/acc"}
  assert "Phase changes" in capsys.readouterr().out
  assert command.parse_curve("fsl_train/acc") == command.CurveSpec("fsl_train", "acc", "up", 0.8)
  assert command.parse_curve("x/y:down").level == pytest.approx(0.4 * math.log(2))


def test_loader_streams_and_restores_runs(trained):
  wd = loader.open_workdir(trained)
  assert wd.group_runs() == {0: [0, 1, 2, 3]}
  seen = list(loader.stream(trained, 0))
  assert [s for s, _ in seen] == [320, 640]
  stacked = seen[-1][1]
  one = loader.restore_run(wd, 640, 3)
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(one)):
    np.testing.assert_array_equal(np.asarray(a)[3], b)
  # Breaking off early stops the reader thread (it would otherwise stay alive,
  # holding the next checkpoint).
  import threading
  before = set(threading.enumerate())
  it = loader.stream(trained, 0, prefetch=1)
  next(it)
  started = set(threading.enumerate()) - before
  assert started  # the reader, blocked on the queue (prefetch 1 of 2 checkpoints)
  it.close()
  for t in started:
    t.join(timeout=30)
  assert not [t for t in started if t.is_alive()]


def test_a_missing_step_or_run_says_what_exists(trained):
  wd = loader.open_workdir(trained)
  with pytest.raises(ckpt_lib.CheckpointNotFound,
                     match=r"no stream checkpoint at step 500; the nearest are at 320, 640 "
                           r"\(of 2, 320 to 640,"):
    loader.restore_run(wd, 500, 0)
  with pytest.raises(IndexError, match=r"no run 7 .*its runs are 0 to 3"):
    loader.restore_run(wd, 640, 7)
  with pytest.raises(IndexError, match=r"run index 4 is out of range: group 0 has runs 0 to 3"):
    ckpt_lib.restore_run(trained, 640, 0, 4)


def test_misspelt_measure_and_curve_get_the_closest(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  with pytest.raises(ConfigError, match=r"unknown measure\(s\) ov_copyng; did you mean ov_copying\?"):
    command.analyze(wd, measures="ov_copyng", quiet=True)
  with pytest.raises(ConfigError, match=r"no metric matches fsl_train/los in metrics.csv; did you "
                                        r"mean fsl_train/loss\?"):
    command.analyze(wd, curves=["fsl_train/los"], quiet=True)
  assert not os.path.exists(os.path.join(wd, "analysis"))


def test_plot_refuses_a_directory_that_is_not_a_workdir(tmp_path, capsys):
  d = tmp_path / "not_a_workdir"
  d.mkdir()
  (d / "notes.txt").write_text("mine")
  assert cli.main(["plot", "--workdir", str(d)]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"icldyn: error: --workdir: {d} has no config.json; is it an icldyn train workdir?"
  assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]  # nothing written


def test_densify_reproduces_the_stored_run(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  before = len(wd_lib.read_csv(os.path.join(wd, "metrics.csv")))
  result = densify.densify(wd, window="160:480", num=3, quiet=True)
  (g,) = result["groups"]
  assert g["dense_steps"] == [240, 400]  # 320 is already in the stream
  assert g["checked_metrics"] > 0 and g["checked_checkpoints"] == 1
  steps = loader.stream_steps(wd, 0)
  assert set(g["dense_steps"]) - {320} <= set(steps) and len(steps) == 2 + result["saved"]
  metrics = wd_lib.read_csv(os.path.join(wd, "metrics.csv"))
  assert len(metrics) > before
  assert not os.path.exists(os.path.join(wd, "checkpoints", "g0", densify.STAGING))
  # The dense checkpoints feed analyze.
  assert command.analyze(wd, measures="ov_copying", quiet=True)["checkpoints"] == len(steps)

  # A stored value the re-run cannot reproduce: nothing is written.
  bad = _copy(trained, tmp_path, "bad")
  path = os.path.join(bad, "metrics.csv")
  lines = open(path).read().splitlines()
  i = next(i for i, l in enumerate(lines) if l.startswith("320,0,fsl_train,loss,"))
  lines[i] = "320,0,fsl_train,loss,0.123"
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(densify.NotReproduced, match="fsl_train/loss of run 0 at 320"):
    densify.densify(bad, window="160:480", num=3, quiet=True)
  assert loader.stream_steps(bad, 0) == [320, 640]
  with pytest.raises(ConfigError, match="--window"):
    densify.densify(bad, window="5", quiet=True)


def test_densify_command_with_its_automatic_window(trained, tmp_path, capsys):
  # `icldyn densify` with the default --window auto: the window is found from
  # each run's transition of --curve (here where the fsl_train loss falls
  # through 1.6 nats, ~ln 5, unclipped, which these short runs cross).
  wd = _copy(trained, tmp_path)
  loss = {}
  for r in _read(os.path.join(wd, "metrics.csv")):
    if r["evaluator"] == "fsl_train" and r["metric"] == "loss":
      loss.setdefault(int(r["run"]), []).append((int(r["step"]), float(r["value"])))
  crossings = [next(s for s, v in sorted(pts) if v < 1.6) for pts in loss.values()]
  assert cli.main(["densify", "--workdir", wd, "--num", "2", "--curve",
                   "fsl_train/loss:down:1.6:none", "--quiet"]) == 0
  saved = int(capsys.readouterr().err.split("densify saved ")[1].split()[0])
  steps = loader.stream_steps(wd, 0)
  dense = sorted(set(steps) - {320, 640})
  assert saved == len(dense) > 0
  # Every dense step lies inside the stored evaluations around a transition:
  # after the first evaluation and no later than the last crossing's evaluation.
  assert all(0 < s <= max(crossings) for s in dense), (dense, crossings)


def test_demo_command_trains_analyses_and_plots(trained, tmp_path, monkeypatch, capsys):
  # `icldyn demo`: the command loads the demo study and hands it to
  # pipeline.run_study with its workdir. The demo's own grid trains for
  # minutes, so the call runs on this module's tiny config (a finished copy:
  # train resumes it, then analyze, plots and report run for real).
  from icldyn import config as config_lib
  from icldyn import pipeline, studies
  wd = _copy(trained, tmp_path)
  shutil.rmtree(os.path.join(wd, "plots"), ignore_errors=True)
  seen = []
  run_study = pipeline.run_study

  def tiny(cfg, workdir, axes=None, quiet=False):
    seen.append((config_lib.to_json(cfg), workdir, quiet))
    return run_study(tiny_config(), workdir, ["seeds.init=0,1", "train.learning_rate=1e-3,2e-3"],
                     quiet=quiet)

  monkeypatch.setattr(pipeline, "run_study", tiny)
  assert cli.main(["demo", "--workdir", wd, "--quiet"]) == 0
  assert seen == [(config_lib.to_json(studies.load("demo")), wd, True)]
  err = capsys.readouterr().err
  assert "icldyn demo: 4 runs" in err
  assert os.path.join(wd, "metrics.csv") in err and os.path.join(wd, "report.md") in err
  for name in ("analysis/phase_changes.csv", "analysis/summary.csv", "report.md",
               "plots/phase_curves.png"):
    assert os.path.exists(os.path.join(wd, name)), name


def test_analyze_keeps_the_edge_timings_of_icldyn_patch(tmp_path):
  # phase_changes.csv as `icldyn patch` leaves it: a measured curve's row
  # (analyze recomputes it) and two edge rows (analyze cannot: it does not
  # patch). Only the edge rows are kept, and they are summarised over seeds
  # like every other curve: mean of the crossed midpoints, 150 and 250.
  columns = ["run", "seeds.init", "data.burstiness", *command.TIMING_COLUMNS]
  path = tmp_path / "phase_changes.csv"
  rows = [[0, 0, 1, "fsl_train/loss", "threshold", "", 400.0, "", True, ""],
          [0, 0, 1, "patching/L0H0->L1H2.k", "threshold", "", 150.0, "", True, ""],
          [1, 1, 1, "patching/L0H0->L1H2.k", "threshold", "", 250.0, "", True, ""]]
  with path.open("w", newline="") as f:
    csv.writer(f).writerows([columns, *rows])
  kept = command.patching_rows(str(path), columns)
  assert [(r["run"], r["curve"]) for r in kept] == [("0", "patching/L0H0->L1H2.k"),
                                                    ("1", "patching/L0H0->L1H2.k")]
  (summary,) = command.summary_rows(kept, ["seeds.init", "data.burstiness"])
  assert (summary["curve"], summary["n_crossed"], summary["mean"]) == (
      "patching/L0H0->L1H2.k", 2, 200.0)
  # Another grid's file (other columns) and no file: nothing kept.
  assert command.patching_rows(str(path), columns[:1] + columns[2:]) == []
  assert command.patching_rows(str(tmp_path / "missing.csv"), columns) == []
