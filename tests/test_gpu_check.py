"""`make gpu-check` (icldyn/gpu_check.py) on CPU: its table, green.

On a GPU machine the same script trains on the GPU; here `--cpu --small`
runs every row on CPU with a tiny model and one bench size, sharing the
tests' compilation cache (so a warm run costs mostly process starts).
"""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

ROWS = ("backend", "train twice", "kill and resume", "densify", "analyze and plot",
        "float32 vs CPU")


def _run(args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "icldyn.gpu_check"] + args, env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


# About 160 s on the 2 shared cores of this workplace even with a warm
# compilation cache (seven `icldyn` processes of ~12 s each and a bench child),
# so it is left to `make test-slow`; CI runs the same check through
# `make gpu-check GPU_CHECK_ARGS='--cpu --small'` (.ci/run).
@pytest.mark.slow
def test_gpu_check_runs_green_on_cpu(tmp_path):
  cache = os.environ.get("ICLDYN_TEST_CACHE", os.path.join(ROOT, ".jax_cache"))
  proc = _run(["--cpu", "--small", "--workdir", str(tmp_path / "wd"),
               "--cache", cache], tmp_path)
  print(proc.stdout)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("icldyn gpu-check: jax ") and "backend cpu" in lines[0]
  for name in ROWS:
    row = [x for x in lines if x.startswith(name + " ")]
    assert row and row[0][22:27].strip() == "PASS", (name, proc.stdout)
  assert any(x.startswith("bench 1 run ") and " INFO " in x and "run-steps/s" in x for x in lines)
  assert lines[-1] == "icldyn gpu-check: PASS"


def test_gpu_check_refuses_a_cpu_backend_unless_asked(tmp_path):
  """A CPU backend without --cpu is a failed check (a CPU build of JAX on a GPU
  machine), reported before anything is trained."""
  proc = _run(["--small", "--workdir", str(tmp_path / "wd")], tmp_path)
  assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
  backend = [x for x in proc.stdout.splitlines() if x.startswith("backend ")][0]
  assert " FAIL " in backend and "JAX found no accelerator" in backend
  assert "train twice" not in proc.stdout
  assert not os.path.exists(tmp_path / "wd" / "a")
