"""report.md (icldyn.report): one number, one source, and what the report holds.

The workdir is synthetic (no training): runs.csv and config.json of a real
grid (two class counts x three seeds), and a metrics.csv whose fsl_train
loss falls from the plateau through a logistic drop at a midpoint known per
run, so the timings are checked against the curves that made them.
"""

import io
import os
import re

import numpy as np
import pytest

from icldyn import build, report, runner
from icldyn.analysis import command
from icldyn.store import files
from conftest import tiny_config

MIDPOINTS = {0: 3000, 1: 3400, 2: 2600, 3: 6000, 4: 6600, 5: 5400}  # run -> sequences


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("report") / "wd")
  os.makedirs(path)
  prepared = build.prepare(tiny_config(), ["data.num_train_classes=12,14", "seeds.init=0,1,2"])
  files.write_json(os.path.join(path, files.CONFIG_JSON), prepared.resolved())
  files.write_runs(os.path.join(path, files.RUNS_CSV),
                   runner.run_rows(prepared, {r: ("done", -1) for r in range(6)}))
  steps = np.arange(0, 10_001, 200)
  lines = [",".join(files.METRICS_HEADER)]
  for run, mid in MIDPOINTS.items():
    loss = 0.05 + (1.2 - 0.05) / (1 + np.exp((steps - mid) / 300))
    lines += [f"{s},{run},fsl_train,loss,{v!r}" for s, v in zip(steps, loss.tolist())]
  with open(os.path.join(path, files.METRICS_CSV), "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def test_analyze_and_the_report_give_the_same_headline_interval(workdir):
  out = io.StringIO()
  command.analyze(workdir, measures="", curves=["fsl_train/loss"], out=out)
  table = out.getvalue()
  assert f"{files.HEADLINE_ESTIMATOR} 95% CI" in table
  printed = [tuple(float(x) for x in m) for m in
             re.findall(r"\[([\d.e+]+), ([\d.e+]+)\]\s*$", table, re.M)]
  text = report.write_report(workdir).read_text()
  assert f"{files.HEADLINE_ESTIMATOR} 95% CI" in text
  written = [tuple(float(x.replace(",", "")) for x in m) for m in
             re.findall(r"\| \[([\d,]+), ([\d,]+)\] \|", text)]
  assert len(printed) == len(written) == 2  # one line per data setting, in the same order
  for a, b in zip(printed, written):
    # The table prints 3 significant digits, the report whole sequences.
    np.testing.assert_allclose(a, b, rtol=5e-3)


def test_the_headline_midpoints_are_where_the_curves_cross(workdir):
  """The threshold estimator's midpoint of each setting lies between its seeds'
  true crossings of the level (0.4 ln 2 for a loss), the rows the report shows."""
  command.analyze(workdir, measures="", curves=["fsl_train/loss"], quiet=True)
  text = report.write_report(workdir).read_text()
  level = 0.4 * np.log(2)
  crossing = {r: m + 300 * np.log((1.2 - 0.05) / (level - 0.05) - 1)
              for r, m in MIDPOINTS.items()}
  rows = re.findall(r"^\| (\d+) \| 3/3 \| ([\d,]+) ± ([\d,]+) \|", text, re.M)
  assert [b for b, _, _ in rows] == ["12", "14"]
  for (classes, mean, _), runs in zip(rows, ([0, 1, 2], [3, 4, 5])):
    want = np.mean([crossing[r] for r in runs])
    # Linear interpolation between evaluations 200 sequences apart.
    assert abs(float(mean.replace(",", "")) - want) < 25


def test_the_report_holds_grid_versions_and_estimator_names(workdir):
  command.analyze(workdir, measures="", curves=["fsl_train/loss"], quiet=True)
  text = report.write_report(workdir).read_text()
  assert "Axes: `data.num_train_classes=12,14`, `seeds.init=0,1,2`" in text
  grid = text.split("## Grid")[1].split("##")[0]
  assert len(re.findall(r"^\| \d \| \d \| 1[24] \|", grid, re.M)) == 6  # run, init, classes
  assert re.search(r"Written with icldyn [\d.]+, jax [\d.]+", text)
  assert f"{files.HEADLINE_ESTIMATOR} midpoint (mean ± std)" in text
