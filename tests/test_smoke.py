"""End to end: `icldyn train` on the paper study's smoke variant, then analyze and plot."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _icldyn(*args, env_extra=None):
  env = dict(os.environ, ICLDYN_COMPILATION_CACHE=os.path.join(ROOT, ".jax_cache"))
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "icldyn", *args], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("smoke") / "wd"
  out = _icldyn("train", "--config", "experiments/ih_paper.py:smoke", "--workdir", str(wd))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "seq/s/run" in out.stderr  # progress line
  return wd, out


def test_train_writes_every_output(smoke_dir):
  wd, _ = smoke_dir
  for name in ("config.json", "runs.csv", "metrics.csv", "checkpoints/g0/stream",
               "checkpoints/g0/resume", "tb/run_0"):
    assert (wd / name).exists(), name
  rows = list(csv.DictReader(open(wd / "metrics.csv")))
  evaluators = {r["evaluator"] for r in rows}
  assert {"train", "fsl_train", "fsl_val_rl", "fsl_train_valex", "fsl_test_class",
          "fsl_train@keep_head_0", "fsl_train@ablate_head_1_0"} <= evaluators
  assert os.listdir(wd / "tb" / "run_0")  # an event file




def test_analyze_and_plot(smoke_dir):
  wd, _ = smoke_dir
  out = _icldyn("analyze", "--workdir", str(wd))
  assert out.returncode == 0, out.stderr[-2000:]
  for name in ("progress.csv", "phase_changes.csv", "summary.csv"):
    assert (wd / "analysis" / name).exists(), name
  out = _icldyn("plot", "--workdir", str(wd))
  assert out.returncode == 0, out.stderr[-2000:]
  assert (wd / "report.md").exists()
  assert any(p.suffix == ".png" for p in (wd / "plots").iterdir())


def test_token_task_smoke_train_analyze_plot(tmp_path):
  """The token task's smoke study through every command: the workdir's outputs,
  its metrics, the analysis tables and the figures (docs/tasks.md)."""
  wd = tmp_path / "tok"
  out = _icldyn("train", "--config", "experiments/repeat_tokens.py:smoke", "--workdir", str(wd),
                "--quiet")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "seq/s/run" not in out.stderr  # --quiet: no progress line (smoke_dir has them)
  for name in ("config.json", "runs.csv", "metrics.csv", "checkpoints/g0/stream",
               "checkpoints/g0/resume"):
    assert (wd / name).exists(), name
  # TensorBoard names each run by the settings the study's grid varies.
  assert [p.name for p in (wd / "tb").iterdir() if p.name.split(",")[0] == "run_0"]
  rows = list(csv.DictReader(open(wd / "metrics.csv")))
  names = {(r["evaluator"], r["metric"]) for r in rows}
  assert {("tok_train", m) for m in ("loss", "loss_repeated", "icl_score", "prefix_matching.h0",
                                     "prev_token.h3")} <= names
  out = _icldyn("analyze", "--workdir", str(wd), "--quiet")
  assert out.returncode == 0, out.stderr[-2000:]
  curves = {r["curve"] for r in csv.DictReader(open(wd / "analysis" / "phase_changes.csv"))}
  assert "tok_train/loss_repeated" in curves
  progress = {r["measure"] for r in csv.DictReader(open(wd / "analysis" / "progress.csv"))}
  assert {"ov_copying", "k_composition"} <= progress
  out = _icldyn("plot", "--workdir", str(wd))
  assert out.returncode == 0, out.stderr[-2000:]
  pngs = {p.name for p in (wd / "plots").iterdir()}
  assert {"phase_curves.png", "progress_heads.png", "attention_patterns.png"} <= pngs
