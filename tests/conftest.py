"""Shared test set-up: a tiny config, compile-time savings, subprocess helpers.

Compiling is the slow part of these tests on a 2-core CPU, so programs are
kept tiny, JAX's persistent compilation cache is shared across the session
(and across sessions, under .jax_cache/, which git ignores), and XLA's CPU
back end compiles at optimisation level 0 (`OPT_FLAG`): it takes 40 % off the
compile-bound tests (145 s -> 89 s for test_fast_paths + test_model, cold
cache) and changes nothing the tests assert: a program is as deterministic at
level 0 as at level 2, and comparisons between different programs carry
tolerances anyway. Subprocesses inherit it; tests/test_isa.py removes it,
since its point is the code generation users get.
"""

import os
import struct
import subprocess
import sys

OPT_FLAG = "--xla_backend_optimization_level=0"
if OPT_FLAG not in os.environ.get("XLA_FLAGS", "") and not os.environ.get("ICLDYN_TEST_FULL_OPT"):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPT_FLAG}".strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `icldyn` subprocesses use one CPU device, as in-process tests do, so their
# results compare bitwise; multi-device tests set XLA_FLAGS themselves.
os.environ.setdefault("ICLDYN_CPU_DEVICES", "1")
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("ICLDYN_TEST_CACHE", os.path.join(ROOT, ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def tiny_config(**overrides):
  """A small but complete config (seconds to train); overrides as dotted kwargs."""
  from icldyn.config import base_config, set_field
  c = base_config()
  values = {
      "model.d_model": 16, "model.num_heads": 2, "data.dim": 16,
      "data.num_train_classes": 12, "data.num_test_classes": 6, "data.num_labels": 5,
      "train.num_sequences": 640, "train.batch_size": 16, "train.learning_rate": 1e-3,
      "train.eval_every": 160, "eval.size": 32, "eval.batch": 32,
      "checkpoint.every": 320, "checkpoint.resume_every": 320,
  }
  values.update({k.replace("__", "."): v for k, v in overrides.items()})
  for k, v in values.items():
    set_field(c, k, v)
  return c


@pytest.fixture
def tiny():
  return tiny_config


def run_python(code: str, devices: int = 1, timeout: int = 600) -> str:
  """Runs Python code in a subprocess with `devices` fake CPU devices; returns stdout."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
  if out.returncode != 0:
    raise AssertionError(f"subprocess failed ({out.returncode}):\n{out.stderr[-3000:]}")
  return out.stdout


def event_records(path):
  """TFRecord payloads of an event file (a torn last record is skipped, as TensorBoard does)."""
  data = open(path, "rb").read()
  i = 0
  while i + 12 <= len(data):
    n = struct.unpack("<Q", data[i:i + 8])[0]
    if i + 12 + n + 4 > len(data):
      break
    yield data[i + 12:i + 12 + n]
    i += 12 + n + 4


def tensorboard_view(run_dir):
  """{tag: [(step, value), ...]} of the scalars TensorBoard shows a run, parsed from the
  event files with tensorboardX's protobufs (not icldyn's writer): a
  SessionLog.START at step s (tensorboardX purge_step) discards the events
  read so far with step >= s."""
  from tensorboardX.proto.event_pb2 import Event, SessionLog
  scalars = {}
  for name in sorted(os.listdir(run_dir)):
    for rec in event_records(os.path.join(run_dir, name)):
      ev = Event.FromString(rec)
      if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
        scalars = {k: [(s, v) for s, v in sv if s < ev.step] for k, sv in scalars.items()}
      for v in ev.summary.value:
        if v.WhichOneof("value") == "simple_value" and not v.metadata.plugin_data.plugin_name:
          scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
  return scalars


def tensorboard_run_dir(workdir, run: int) -> str:
  """The directory of a run's events: `tb/run_{i}` or `tb/run_{i},name=value...`."""
  root = os.path.join(str(workdir), "tb")
  found = [n for n in os.listdir(root) if n == f"run_{run}" or n.startswith(f"run_{run},")]
  assert len(found) == 1, (run, sorted(os.listdir(root)))
  return os.path.join(root, found[0])
