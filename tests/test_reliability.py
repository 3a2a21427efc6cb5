"""Reliability: kills at chosen and random instants, preemption, damaged checkpoints,
divergence, disk full. Each interrupted workdir, once resumed, must equal an
uninterrupted run's: metrics.csv and runs.csv byte for byte, every stream
checkpoint and the final resume state bitwise, and TensorBoard as TensorBoard
shows it (after its purge of events past a restart).

Subprocesses train through the CLI with `ICLDYN_FAULT=POINT:N[:SIGNAL]`
(icldyn/faults.py) choosing reproducible kill points; they share the
persistent compilation cache, so each costs ~5 s (start-up and tracing).
"""

import glob
import logging
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from icldyn.store import checkpoints as ckpt_lib
from icldyn import cli, runner
from conftest import ROOT, tensorboard_view, tiny_config

# 40 steps of 16 sequences: evaluation every 5 steps (one chunk), stream and
# resume checkpoints every 10 steps.
OVERRIDES = {"train.eval_every": 80, "checkpoint.every": 160, "checkpoint.resume_every": 160}
AXES = ["seeds.init=0,1,2"]
TOTAL = 640

STUDY = f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
from conftest import tiny_config

def get_config(arg=""):
  c = tiny_config(**{OVERRIDES!r})
  with c.unlocked():
    c.grid = {tuple(AXES)!r}
  return c
"""


def _cfg():
  c = tiny_config(**OVERRIDES)
  with c.unlocked():
    c.grid = tuple(AXES)
  return c


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  path = tmp_path_factory.mktemp("study") / "tiny_study.py"
  path.write_text(STUDY)
  return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run."""
  path = tmp_path_factory.mktemp("reference") / "wd"
  runner.train(_cfg(), str(path), quiet=True)
  return str(path)


def _env(fault=None):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(ROOT, ".jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env.pop("ICLDYN_FAULT", None)
  if fault:
    env["ICLDYN_FAULT"] = fault
  return env


def _command(study, workdir, quiet=True):
  return ([sys.executable, "-m", "icldyn", "train", "--config", study, "--workdir", workdir]
          + (["--quiet"] if quiet else []))


def _cli(study, workdir, fault=None):
  """Trains in a subprocess; returns (exit code, stderr)."""
  out = subprocess.run(_command(study, workdir), env=_env(fault), capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  return out.returncode, out.stderr


# Every wait on a subprocess is bounded: a stuck run fails its test, not the suite.
WAIT_S = 300


def _start(study, workdir):
  """Starts training in a subprocess and waits until its first chunk is about to run."""
  p = subprocess.Popen(_command(study, workdir, quiet=False), env=_env(), cwd=ROOT,
                       stderr=subprocess.PIPE, text=True)
  lines = []
  timer = threading.Timer(WAIT_S, p.kill)  # unblocks the read below if the run hangs
  timer.start()
  try:
    for line in p.stderr:
      lines.append(line)
      if "compiled in" in line:
        break
  finally:
    timer.cancel()
  assert p.poll() is None or lines, f"the run did not start within {WAIT_S}s"
  return p, lines


def _finish(p):
  """(rest of stderr, exit code) of a started subprocess, killing it after WAIT_S."""
  try:
    _, err = p.communicate(timeout=WAIT_S)
  except subprocess.TimeoutExpired:
    p.kill()
    p.communicate()
    raise AssertionError(f"the run did not end within {WAIT_S}s")
  return err, p.returncode


def _wait_for_rows(path, step, p):
  """Waits until metrics.csv holds rows of `step` sequences or later."""
  deadline = time.monotonic() + WAIT_S
  while True:
    assert p.poll() is None, "the run ended first"
    assert time.monotonic() < deadline, f"no rows of step {step} within {WAIT_S}s"
    last = open(path).read().rstrip("\n").rpartition("\n")[2].split(",")[0]
    if last.isdigit() and int(last) >= step:
      return
    time.sleep(0.01)


# --------------------------------------------------------------------------
# Comparing workdirs.


def _resume_state(workdir, step=TOTAL):
  store = ckpt_lib.Store(workdir, 0, read_only=True)
  try:
    return store.resume.restore(step, args=ocp.args.StandardRestore())
  finally:
    store.close()


def assert_same_workdir(got, want, tensorboard=True):
  for name in ("config.json", "runs.csv", "metrics.csv"):
    a, b = open(os.path.join(got, name)).read(), open(os.path.join(want, name)).read()
    assert a == b, f"{name} differs"
  sa, sb = list(ckpt_lib.stream(got)), list(ckpt_lib.stream(want))
  assert [s for s, _ in sa] == [s for s, _ in sb]
  for (_, pa), (_, pb) in zip(sa, sb):
    jax.tree.map(np.testing.assert_array_equal, pa, pb)
  jax.tree.map(np.testing.assert_array_equal, _resume_state(got), _resume_state(want))
  leftovers = glob.glob(os.path.join(got, "**", "*orbax-checkpoint-tmp*"), recursive=True)
  assert not leftovers, leftovers
  if tensorboard:
    runs = sorted(os.listdir(os.path.join(want, "tb")))
    assert runs == sorted(os.listdir(os.path.join(got, "tb")))
    for run in runs:
      view = tensorboard_view(os.path.join(want, "tb", run))
      # Not vacuous: every evaluation of the run is there (TOTAL / 80 + 1 steps per tag).
      assert view and all(len(v) == TOTAL // 80 + 1 for k, v in view.items()
                          if not k.startswith("train/")), run
      assert tensorboard_view(os.path.join(got, "tb", run)) == view, run


# --------------------------------------------------------------------------
# Kills and signals.

# Each entry kills (or signals) the next process of the chain; every process
# resumes from what the previous one left. Comments: the state each leaves.
CHAIN = [
    ("in_metrics:2", -9),          # the step-80 rows torn; no checkpoint yet
    ("in_checkpoint:1", -9),       # from 0: stream/160 in orbax's tmp dir, not renamed
    ("in_checkpoint:2", -9),       # from 0: stream/160 done, resume/160 in its tmp dir
    ("after_checkpoint:2", -9),    # from 0 (stream/160 redone): resume/160 done
    ("after_metrics:1", -9),       # from 160: the step-240 rows appended
    ("after_chunk:3:INT", 75),     # from 160: SIGINT at 400, an off-schedule resume checkpoint
    ("before_manifest:2", -9),     # from 400: stream/480 done, resume/480 renamed, not sealed
    ("after_checkpoint:1", -9),    # from 480 (now sealed): stream/640 done, resume/640 not
    (None, 0),                     # from 480: to the end
]


@pytest.mark.slow  # eight kill points, each a training and a resume: 4-5 minutes on 2 cores
def test_kills_at_chosen_points_then_resume_equal_an_uninterrupted_run(study, reference,
                                                                        tmp_path):
  wd = str(tmp_path / "wd")
  for fault, want in CHAIN:
    code, err = _cli(study, wd, fault)
    assert code == want, (fault, err[-2000:])
    if fault == "in_metrics:2":
      assert not open(os.path.join(wd, "metrics.csv")).read().endswith("\n")  # really torn
    if fault and fault.startswith("in_checkpoint"):
      assert glob.glob(os.path.join(wd, "checkpoints", "g0", "*", "*.orbax-checkpoint-tmp*"))
    if want == 75:
      assert "stopped by SIGINT at 400 sequences" in err and "resume with:" in err
    sealed = os.path.join(wd, "checkpoints", "g0", "resume", "480", ckpt_lib.MANIFEST)
    if fault == "before_manifest:2":
      assert os.path.isdir(os.path.dirname(sealed)) and not os.path.exists(sealed)
    if fault == "after_checkpoint:1":  # the unsealed state was complete: resumed from and sealed
      assert os.path.exists(sealed)
  assert_same_workdir(wd, reference)


def test_kills_at_random_instants_then_resume_equal_an_uninterrupted_run(study, reference,
                                                                          tmp_path):
  # Seeded, so a failure reproduces: the kill instants are the same every run
  # (other kill points are the chosen ones of the test above).
  seed = 19
  rng = random.Random(seed)
  wd = str(tmp_path / "wd")
  killed = 0
  for _ in range(2):
    p, _ = _start(study, wd)
    time.sleep(rng.uniform(0.0, 0.9))
    p.kill()
    killed += _finish(p)[1] == -signal.SIGKILL
  assert killed, f"no kill landed before the run finished (seed {seed})"
  code, err = _cli(study, wd)
  assert code == 0, err
  assert_same_workdir(wd, reference)


@pytest.mark.slow  # about 55 s; the random-kill resume test stays in make test
def test_sigterm_writes_a_resume_checkpoint_and_says_how_to_resume(study, reference, tmp_path):
  wd = str(tmp_path / "wd")
  p, lines = _start(study, wd)
  _wait_for_rows(os.path.join(wd, "metrics.csv"), 80, p)  # training is under way
  time.sleep(random.Random(7).uniform(0.0, 0.4))  # seeded: reproducible
  p.send_signal(signal.SIGTERM)
  rest, code = _finish(p)
  err = "".join(lines) + rest
  assert code == cli.EXIT_PREEMPTED, err
  last = err.strip().splitlines()[-1]
  m = re.search(r"stopped by SIGTERM at (\d+) sequences.*resume with: (.*)$", last)
  assert m, err
  stopped = int(m.group(1))
  assert 0 < stopped < TOTAL
  store = ckpt_lib.Store(wd, 0, read_only=True)
  assert store.resume_steps()[-1] == stopped
  store.close()
  # The printed command resumes.
  out = subprocess.run(shlex.split(m.group(2)), env=_env(), capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr
  assert f"resuming at {stopped} sequences" in out.stderr
  assert_same_workdir(wd, reference)


# --------------------------------------------------------------------------
# Damaged checkpoints.


def _damage(step_dir, how):
  files = sorted(glob.glob(os.path.join(step_dir, "default", "ocdbt.process_0", "d", "*")),
                 key=os.path.getsize)
  big = files[-1]
  if how == "flip":  # silent: orbax restores it; only the checksum tells
    b = bytearray(open(big, "rb").read())
    b[len(b) // 2] ^= 0xFF
    open(big, "wb").write(bytes(b))
  elif how == "truncate":
    os.truncate(big, os.path.getsize(big) // 2)
  elif how == "remove_file":
    os.remove(big)
  elif how == "remove_metadata":
    os.remove(os.path.join(step_dir, "default", "_METADATA"))
  elif how == "empty":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


@pytest.mark.parametrize("how", ["flip", "truncate", "remove_file", "remove_metadata", "empty"])
def test_a_damaged_resume_checkpoint_is_named_and_set_aside(reference, tmp_path, how):
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  _damage(os.path.join(wd, "checkpoints", "g0", "resume", str(TOTAL)), how)
  like = _resume_state(reference, 480)
  store = ckpt_lib.Store(wd, 0)
  try:
    step, state, damaged = store.restore_latest_state(like)
  finally:
    store.close()
  assert step == 480
  jax.tree.map(np.testing.assert_array_equal, state, like)
  [(err, moved)] = damaged
  assert err.step == TOTAL and err.path == os.path.join(wd, "checkpoints", "g0", "resume", "640")
  assert f"at step {TOTAL} ({err.path}) is damaged" in str(err)
  assert moved == os.path.join(wd, "checkpoints", "g0", "damaged", "resume_640")
  assert os.path.isdir(moved) and not os.path.exists(err.path)


def test_an_intact_state_of_another_shape_is_refused_not_set_aside(reference, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  like = _resume_state(reference, 480)
  like["acc_loss"] = np.zeros(4)  # as if the train state had changed
  store = ckpt_lib.Store(wd, 0)
  try:
    with pytest.raises(ckpt_lib.CheckpointMismatch, match="is intact but does not fit"):
      store.restore_latest_state(like)
  finally:
    store.close()
  assert store.resume_steps() == [480, TOTAL]


def test_resume_falls_back_past_a_damaged_checkpoint(reference, tmp_path, caplog):
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  _damage(os.path.join(wd, "checkpoints", "g0", "resume", str(TOTAL)), "truncate")
  with caplog.at_level(logging.WARNING, logger="icldyn.runner"):
    runner.train(_cfg(), wd, quiet=True)
  text = caplog.text
  assert f"resume checkpoint at step {TOTAL} ({wd}/checkpoints/g0/resume/{TOTAL}) is damaged" in text
  assert "falling back to the newest intact resume checkpoint, step 480" in text
  shutil.rmtree(os.path.join(wd, "checkpoints", "g0", "damaged"))
  assert_same_workdir(wd, reference)


def test_with_every_resume_checkpoint_damaged_training_starts_over(reference, tmp_path, caplog):
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  for step in (480, TOTAL):
    _damage(os.path.join(wd, "checkpoints", "g0", "resume", str(step)), "flip")
  with caplog.at_level(logging.WARNING, logger="icldyn.runner"):
    runner.train(_cfg(), wd, quiet=True)
  assert "no intact resume checkpoint left, starting over" in caplog.text
  shutil.rmtree(os.path.join(wd, "checkpoints", "g0", "damaged"))
  assert_same_workdir(wd, reference)


def test_a_damaged_stream_checkpoint_is_named(reference, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  _damage(os.path.join(wd, "checkpoints", "g0", "stream", "320"), "flip")
  with pytest.raises(ckpt_lib.CheckpointDamaged, match=r"stream checkpoint at step 320 .*"
                     r"stream/320\) is damaged"):
    list(ckpt_lib.stream(wd))


# --------------------------------------------------------------------------
# Divergence.


def _metrics(path):
  import csv
  with open(os.path.join(path, "metrics.csv")) as f:
    return {(int(r["step"]), int(r["run"]), r["evaluator"], r["metric"]): float(r["value"])
            for r in csv.DictReader(f)}


@pytest.mark.slow  # about 95 s on 2 cores
def test_a_diverging_run_is_marked_and_frozen_and_the_others_are_unchanged(reference, tmp_path,
                                                                            study, capsys):
  wd = str(tmp_path / "div")
  code = cli.main(["train", "--config", study, "--workdir", wd, "--quiet",
                   "--grid", "seeds.init+train.learning_rate=0/1e-3,1/1e30,2/1e-3"])
  assert code == cli.EXIT_DIVERGED
  err = capsys.readouterr().err
  assert "1 diverged [1]" in err
  runs = {int(r["run"]): r for r in runner.wd_lib.read_csv(os.path.join(wd, "runs.csv"))}
  assert [runs[i]["status"] for i in range(3)] == ["done", "diverged", "done"]
  # Step 1 makes weights ~1e30, whose norm overflows float32: that step is refused.
  assert runs[1]["diverged_step"] == "16"
  assert runs[0]["diverged_step"] == runs[2]["diverged_step"] == ""
  # Frozen: the diverged run's parameters stay at their last finite value.
  stream = list(ckpt_lib.stream(wd))
  for x, y in zip(jax.tree.leaves(stream[0][1]), jax.tree.leaves(stream[-1][1])):
    assert np.all(np.isfinite(x[1])) and np.array_equal(x[1], y[1])
  # The other runs equal the same grid with a normal learning rate for run 1, bitwise.
  m, ref = _metrics(wd), _metrics(reference)
  for k, v in ref.items():
    if k[1] != 1:
      assert m[k] == v or (np.isnan(v) and np.isnan(m[k])), k
  for (_, p), (_, q) in zip(stream, ckpt_lib.stream(reference)):
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
      np.testing.assert_array_equal(x[[0, 2]], y[[0, 2]])
  # ... and the grid without run 1, to the documented 1e-6 (another run count).
  without = str(tmp_path / "without")
  runner.train(_cfg(), without, ["seeds.init=0,2"], quiet=True)
  w = _metrics(without)
  keys = [k for k in w]
  a = np.array([w[k] for k in keys])
  b = np.array([m[(k[0], {0: 0, 1: 2}[k[1]], k[2], k[3])] for k in keys])
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
  for (_, p), (_, q) in zip(ckpt_lib.stream(without), stream):
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
      for i, j in ((0, 0), (1, 2)):
        assert np.linalg.norm(x[i] - y[j]) <= 1e-6 * np.linalg.norm(x[i])


# --------------------------------------------------------------------------
# Disk full.


@pytest.fixture
def small_disk(tmp_path):
  """A 560 KiB tmpfs (root with CAP_SYS_ADMIN only), unmounted afterwards."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=560k", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=60)
  if out.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {out.stderr.strip()}")
  yield str(mnt)
  subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=60)


def test_disk_full_is_a_clear_error_and_resumes_once_space_is_freed(reference, small_disk,
                                                                     study, capsys):
  wd = os.path.join(small_disk, "wd")
  code = cli.main(["train", "--config", study, "--workdir", wd, "--quiet"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == cli.EXIT_IO, err
  assert len(err) == 1 and err[0].startswith("icldyn: error: cannot write "), err
  assert wd in err[0] and "No space left on device" in err[0], err
  assert "run the same command to resume" in err[0]
  # The checkpoints written before are intact.
  store = ckpt_lib.Store(wd, 0, read_only=True)
  steps = store.resume_steps()
  assert steps, "the disk filled before the first resume checkpoint; use a larger tmpfs"
  like = _resume_state(reference, 480)
  for s in steps:
    store.restore_state(s, like)
  for s in store.stream_steps():
    store.restore_params(s)
  store.close()
  subprocess.run(["mount", "-o", "remount,size=64m", small_disk], check=True, timeout=60)
  assert cli.main(["train", "--config", study, "--workdir", wd, "--quiet"]) == 0
  assert_same_workdir(wd, reference)


# --------------------------------------------------------------------------
# Workdir.


@pytest.mark.slow  # about 45 s on 2 cores; the config check itself is tested in test_bad_inputs
def test_overwrite_replaces_a_workdir_of_another_config(reference, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  cfg = _cfg()
  cfg.seeds.eval = 1  # same program, different config
  with pytest.raises(runner.ConfigError, match=r"differs in: config\.seeds\.eval"):
    runner.train(cfg, wd, quiet=True)
  assert_same_workdir(wd, reference)  # refused: untouched
  runner.train(cfg, wd, quiet=True, overwrite=True)
  fresh = str(tmp_path / "fresh")
  runner.train(cfg, fresh, quiet=True)
  assert_same_workdir(wd, fresh)
