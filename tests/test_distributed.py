"""One grid over several processes (`icldyn.distributed`), on CPU with gloo collectives.

Each test starts `icldyn train` as several local processes joined by
`jax.distributed` (subprocesses, free ports, every wait with a timeout) and
compares the workdir with the single-process run on the same total number
of devices, which is the independent computation: metrics.csv, runs.csv and
config.json byte for byte, every stream checkpoint and the final resume
state bitwise. The fault tests check the one-line errors and exit codes of
docs/bad_inputs.md's "Several processes" section.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from icldyn import cli, distributed
from conftest import ROOT
from test_reliability import assert_same_workdir

# 3 runs: on 2 devices they are padded to 4 (process 1 steps run 2 and a copy).
OVERRIDES = {"train.eval_every": 80, "checkpoint.every": 160, "checkpoint.resume_every": 160,
             "eval.clamps": ""}

STUDY = f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
from conftest import tiny_config

def get_config(arg=""):
  c = tiny_config(**{OVERRIDES!r})
  with c.unlocked():
    c.grid = ("seeds.init=0,1,2",)
  if arg == "other":
    c.train.learning_rate = 2e-3
  return c
"""
TIMEOUT = 300


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  path = tmp_path_factory.mktemp("study") / "dist_study.py"
  path.write_text(STUDY)
  return str(path)


def _env(devices, **extra):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["ICLDYN_COMPILATION_CACHE"] = os.path.join(ROOT, ".jax_cache")
  env["ICLDYN_CPU_DEVICES"] = str(devices)
  for k in ("ICLDYN_FAULT", distributed.ADDRESS_ENV, distributed.COUNT_ENV, distributed.ID_ENV):
    env.pop(k, None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _train(study, workdir, *args):
  return [sys.executable, "-m", "icldyn", "train", "--config", study, "--workdir", workdir,
          "--quiet", *args]


def _single(study, workdir, devices):
  out = subprocess.run(_train(study, workdir), env=_env(devices), capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]


def _processes(cmds_envs, timeout=TIMEOUT):
  """Starts one process per (command, env); returns [(exit code, stderr)] once all end."""
  procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
           for cmd, env in cmds_envs]
  try:
    return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)


def _group(n, devices, per_process=None, address=None, count=None):
  """Environments of n processes of one grid ({id: extra env} per process)."""
  address = address or f"127.0.0.1:{distributed.free_port()}"
  envs = []
  for i in range(n):
    extra = {distributed.ADDRESS_ENV: address, distributed.COUNT_ENV: count or n,
             distributed.ID_ENV: i, distributed.TIMEOUT_ENV: 60}
    extra.update((per_process or {}).get(i, {}))
    envs.append(_env(devices, **extra))
  return envs


@pytest.fixture(scope="module")
def reference(study, tmp_path_factory):
  """One process, 2 devices, uninterrupted."""
  wd = str(tmp_path_factory.mktemp("reference") / "wd")
  _single(study, wd, 2)
  return wd


@pytest.mark.slow  # three trainings in subprocesses: about 3 minutes on 2 cores
def test_two_processes_equal_one_process_with_as_many_devices(study, reference, tmp_path):
  """2 processes x 1 device (`--local-processes 2`), 3 runs padded to 4: the workdir is
  the single-process one's, byte for byte and bitwise."""
  wd = str(tmp_path / "wd")
  out = subprocess.run(_train(study, wd, "--local-processes", "2"), env=_env(1),
                       capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  assert_same_workdir(wd, reference)


@pytest.mark.slow  # two trainings (1 x 4 and 2 x 2 devices): 2:12 measured on 2 shared cores
def test_two_processes_of_two_devices_equal_one_process_of_four(study, tmp_path):
  """2 processes x 2 devices against 1 process x 4 devices; 5 runs padded to 8."""
  ref, wd = str(tmp_path / "ref"), str(tmp_path / "wd")
  grid = ["--grid", "seeds.init=0,1,2,3,4"]
  out = subprocess.run(_train(study, ref, *grid), env=_env(4), capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  codes = _processes([(_train(study, wd, *grid), env) for env in _group(2, 2)])
  assert [c for c, _ in codes] == [0, 0], codes[0][1][-3000:] + codes[1][1][-3000:]
  assert_same_workdir(wd, ref)


@pytest.mark.slow  # 2-3 min on 2 shared cores: beyond the suite's budget
def test_a_lost_process_stops_the_others_then_fewer_processes_resume(study, reference, tmp_path):
  """Process 1 is killed mid-run: process 0 stops with one line and exit 75; one
  process (2 devices) resumes the workdir to the uninterrupted run's result."""
  wd = str(tmp_path / "wd")
  envs = _group(2, 1, per_process={1: {"ICLDYN_FAULT": "after_chunk:4"}})
  (c0, e0), (c1, _) = _processes([(_train(study, wd), env) for env in envs])
  assert c1 == -signal.SIGKILL
  assert c0 == distributed.EXIT_PEER_LOST, e0[-3000:]
  assert "another process of the grid stopped" in e0 and "resumable" in e0, e0[-3000:]
  _single(study, wd, 2)
  assert_same_workdir(wd, reference)


@pytest.mark.slow  # 2-3 min on 2 shared cores: beyond the suite's budget
def test_sigterm_to_one_process_stops_all_with_a_resume_checkpoint(study, reference, tmp_path):
  """SIGTERM to process 1 only: both stop at the same step after a resume
  checkpoint (exit 75), and the same command resumes to the uninterrupted result."""
  wd = str(tmp_path / "wd")
  envs = _group(2, 1, per_process={1: {"ICLDYN_FAULT": "after_chunk:3:TERM"}})
  codes = _processes([(_train(study, wd), env) for env in envs])
  assert [c for c, _ in codes] == [cli.EXIT_PREEMPTED] * 2, codes[0][1][-3000:]
  for _, err in codes:
    assert "stopped by SIGTERM at " in err and "after writing a resume checkpoint" in err, err
  codes = _processes([(_train(study, wd), env) for env in _group(2, 1)])
  assert [c for c, _ in codes] == [0, 0], codes[0][1][-3000:]
  assert_same_workdir(wd, reference)


# How long the others may take to stop once process 0 is gone. They learn it
# from closed connections (JAX's coordination client, gloo), not from a
# timeout: measured 0.2-0.5 s. 30 s leaves room for two loaded shared cores
# and stays well under JAX's shortest timeout (heartbeats, 100 s), so a pass
# shows the stop is not a timeout's.
STOP_BOUND_S = 30


def _timed(cmds_envs, logs, timeout=TIMEOUT):
  """Starts one process per (command, env), stderr to the files `logs`; returns
  [(exit code, stderr, seconds from the start to its exit)] once all end."""
  files = [open(l, "w") for l in logs]
  start = time.monotonic()
  procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=f, text=True)
           for (cmd, env), f in zip(cmds_envs, files)]
  ends = {}
  try:
    while len(ends) < len(procs):
      for i, p in enumerate(procs):
        if i not in ends and p.poll() is not None:
          ends[i] = time.monotonic() - start
      assert time.monotonic() - start < timeout, f"still running after {timeout} s"
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
    for f in files:
      f.close()
  return [(p.returncode, open(l).read(), ends[i]) for i, (p, l) in enumerate(zip(procs, logs))]


def _resumable_errors(err):
  """The survivor's `icldyn: error:` lines: at least one, each saying how to resume."""
  lines = [l for l in err.splitlines() if l.startswith("icldyn: error: ")]
  assert lines and all("the workdir is resumable" in l for l in lines), err[-3000:]
  return lines


@pytest.mark.slow  # one 2-process training and one resume: about 2 minutes on 2 shared cores
def test_process_0_dying_stops_the_others_in_bounded_time_then_one_process_resumes(
    study, reference, tmp_path):
  """Process 0 (the writer and JAX's coordinator) is killed mid-run: process 1 stops
  within STOP_BOUND_S with exit 75 and a line saying the workdir is resumable (from
  its own exchange failing, or from JAX's abort, whichever comes first); one process
  (2 devices) resumes the workdir to the uninterrupted run's result."""
  wd = str(tmp_path / "wd")
  envs = _group(2, 1, per_process={0: {"ICLDYN_FAULT": "after_chunk:4"}})
  logs = [str(tmp_path / f"err{i}") for i in range(2)]
  (c0, _, t0), (c1, e1, t1) = _timed([(_train(study, wd), env) for env in envs], logs)
  assert c0 == -signal.SIGKILL
  assert c1 == distributed.EXIT_PEER_LOST, e1[-3000:]
  assert t1 - t0 < STOP_BOUND_S, (t1 - t0, e1[-3000:])
  _resumable_errors(e1)
  assert os.path.exists(os.path.join(wd, "metrics.csv"))  # killed mid-run, not before it
  _single(study, wd, 2)
  assert_same_workdir(wd, reference)


# Joins a 2-process grid with icldyn.distributed, then: process 0 sleeps and (with
# DIE) kills itself; process 1 sleeps in Python, or (with ABORT) aborts at once.
ABORT_SCRIPT = """
import os, signal, sys, time
from icldyn import distributed
assert distributed.initialize()
if os.environ[distributed.ID_ENV] == "0":
  time.sleep(2)
  if os.environ.get("DIE"):
    os.kill(os.getpid(), signal.SIGKILL)
  time.sleep(8)
  os._exit(0)  # not JAX's shutdown barrier: process 1 is gone
if os.environ.get("ABORT"):
  os.abort()
time.sleep(120)
print("process 1 outlived process 0", file=sys.stderr)
"""


@pytest.mark.slow  # two 2-process start-ups without training: about 20 s
def test_jax_abort_on_losing_process_0_becomes_exit_75_and_other_aborts_stay(tmp_path):
  """The abort path alone, as a long chunk meets it: process 1 is not in an exchange
  (it sleeps) when process 0 dies, so only JAX's coordination client sees it and
  aborts; the handler makes that one line and exit 75 within STOP_BOUND_S. An abort
  while process 0 is alive keeps its default (134, no icldyn line)."""
  cmd = [sys.executable, "-c", ABORT_SCRIPT]
  logs = [str(tmp_path / f"err{i}") for i in range(2)]
  (c0, _, t0), (c1, e1, t1) = _timed([(cmd, env) for env in _group(2, 1, {0: {"DIE": 1}})],
                                     logs, timeout=120)
  assert c0 == -signal.SIGKILL
  assert c1 == distributed.EXIT_PEER_LOST, e1[-3000:]
  assert t1 - t0 < STOP_BOUND_S, (t1 - t0, e1[-3000:])
  assert "Terminating process because the JAX distributed service" in e1  # the path tested
  line, = _resumable_errors(e1)
  assert line.startswith("icldyn: error: process 0 of the grid (the coordinator at 127.0.0.1:")
  (c0, _, _), (c1, e1, _) = _timed([(cmd, env) for env in _group(2, 1, {1: {"ABORT": 1}})],
                                   logs, timeout=120)
  assert c0 == 0
  assert c1 == 128 + signal.SIGABRT or c1 == -signal.SIGABRT, (c1, e1[-3000:])
  assert "icldyn: error" not in e1


def _one_error(err):
  lines = [l for l in err.splitlines() if l.startswith("icldyn: error: ")]
  assert len(lines) == 1, err[-3000:]
  return lines[0]


def test_unreachable_coordinator_is_one_line_and_exit_2(study, tmp_path):
  wd = str(tmp_path / "wd")
  env = _group(2, 1)[1]  # process 1 alone: nobody serves the address
  env[distributed.TIMEOUT_ENV] = "3"
  (code, err), = _processes([(_train(study, wd), env)], timeout=120)
  assert code == cli.EXIT_BAD_INPUT, err[-3000:]
  assert distributed.ADDRESS_ENV in _one_error(err) and "within 3 s" in err
  assert not os.path.exists(wd)


def test_bad_process_id_is_one_line_and_exit_2(study, tmp_path):
  wd = str(tmp_path / "wd")
  env = _group(2, 1, per_process={0: {distributed.ID_ENV: 2}})[0]
  (code, err), = _processes([(_train(study, wd), env)], timeout=120)
  assert code == cli.EXIT_BAD_INPUT, err[-3000:]
  assert _one_error(err).startswith(f"icldyn: error: {distributed.ID_ENV}: 2 is not in 0..1")
  assert not os.path.exists(wd)


@pytest.mark.slow  # two multi-process start-ups: about 30 s
def test_different_configs_or_counts_stop_every_process_before_writing(study, tmp_path):
  """Process 1 with another variant of the study, then with another JAX_NUM_PROCESSES:
  every process prints the same one line and exits 2, and nothing is written."""
  wd = str(tmp_path / "wd")
  cmds = [_train(study, wd), _train(study + ":other", wd)]
  codes = _processes(list(zip(cmds, _group(2, 1))), timeout=120)
  for code, err in codes:
    assert code == cli.EXIT_BAD_INPUT, err[-3000:]
    assert "process 1 was started with a different config" in _one_error(err)
  assert not os.path.exists(wd)
  envs = _group(2, 1, per_process={1: {distributed.COUNT_ENV: 3}})
  codes = _processes([(_train(study, wd), env) for env in envs], timeout=120)
  for code, err in codes:
    assert code == cli.EXIT_BAD_INPUT, err[-3000:]
    assert f"process 1 was started with {distributed.COUNT_ENV}=3" in _one_error(err)
  assert not os.path.exists(wd)


def test_local_launcher_passes_everything_but_its_own_flag():
  """A child of `--local-processes` must not launch children of its own."""
  argv = ["train", "--local-processes", "2", "--quiet", "--local-processes=3", "--grid", "x=1"]
  assert distributed.without_local_flag(argv) == ["train", "--quiet", "--grid", "x=1"]
