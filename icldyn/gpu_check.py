"""`make gpu-check`: is this accelerator ready for icldyn? One table, at most 8 minutes.

    python -m icldyn.gpu_check                # on a GPU or TPU machine
    python -m icldyn.gpu_check --cpu --small  # the same checks on CPU, in seconds (a test)

Rows (README: Installing for accelerators):

- backend: the JAX backend and its devices. Without `--cpu`, a CPU backend
  fails the check (a CPU build of JAX, or a GPU JAX cannot see) rather than
  timing the CPU as if it were the accelerator.
- train twice: the smoke study trained into two workdirs, each compiled
  afresh (its own compilation cache, so XLA's autotuning runs twice):
  metrics.csv and every stream checkpoint bitwise identical.
- kill and resume: a third training killed (SIGKILL) after its first
  checkpoint and run again: identical to the uninterrupted one.
- densify: `icldyn densify` re-runs a window, demanding a bit-identical re-run.
- analyze and plot: `icldyn analyze` and `icldyn plot` on the first workdir.
- float32 vs CPU: the same training on the CPU backend; every continuous
  metric of metrics.csv within `TOLERANCE` (accuracies, which flip by whole
  sequences, are left out).
- bench N runs: `python -m icldyn.bench --one N` (the paper model, batch 32):
  run-steps/s, with evaluation, and GFLOP/s as a share of this device's
  float32 matrix-multiply rate measured here.

Every step is a subprocess running the `icldyn` command a user runs; the
check stops starting new rows when its time budget is spent (they show SKIP).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

STUDY = "ih_paper:smoke"
# The smoke study shrunk further for --small (the conftest tiny model).
SMALL = ("--config.model.d_model=16", "--config.model.num_heads=2", "--config.data.dim=16",
         "--config.data.num_train_classes=12", "--config.data.num_test_classes=6",
         "--config.train.learning_rate=1e-3")
# float32 on the accelerator against float32 on CPU, on metrics of O(1). Both
# sum in different orders, so each operation differs by an ulp or so
# (~1e-7 relative); across shapes on CPU, 300 steps moved parameters by at
# most 3e-8 relative (README: Determinism). The smoke study's 50 steps at lr
# 1e-5, evaluated on 32 sequences, leave three orders of magnitude of margin.
TOLERANCE = (1e-4, 1e-4)  # (absolute, relative)
BUDGET_S = 480


@dataclasses.dataclass
class Row:
  check: str
  result: str  # PASS, FAIL, INFO, SKIP
  detail: str
  seconds: float = 0.0


class Checker:
  """Runs the rows in order, each as subprocesses, within a time budget."""

  def __init__(self, workdir: str, cpu: bool, small: bool, budget: float,
               cache: str | None = None):
    self.workdir, self.cpu, self.small, self.shared_cache = workdir, cpu, small, cache
    self.deadline = time.monotonic() + budget
    self.rows: list[Row] = []
    self.env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if cpu:
      self.env["JAX_PLATFORMS"] = "cpu"

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def run(self, args: list[str], cache: str, extra_env: dict | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    """`python -m ARGS` with its own compilation cache; raises on failure if `check`."""
    # --small (the CPU test) shares one cache: its point is the table, and
    # CPU compilation is deterministic (no autotuning).
    cache = (self.shared_cache or os.path.join(self.workdir, "cache") if self.small
             else os.path.join(self.workdir, cache))
    env = dict(self.env, ICLDYN_COMPILATION_CACHE=cache, **(extra_env or {}))
    proc = subprocess.run([sys.executable, "-m"] + args, env=env, capture_output=True,
                          text=True, timeout=max(self.left(), 1.0))
    if check and proc.returncode != 0:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      raise RuntimeError(f"{' '.join(args[:2])} exited {proc.returncode}: {' / '.join(tail)}")
    return proc

  def train(self, name: str, cache: str, extra_env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    args = ["icldyn", "train", "--config", STUDY, "--workdir", self.path(name), "--quiet"]
    return self.run(args + list(SMALL if self.small else ()), cache, extra_env, check)

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def row(self, check: str, fn) -> Row:
    """Runs `fn() -> (result, detail)` as row `check` (SKIP once the budget is spent)."""
    t0 = time.monotonic()
    if self.left() <= 0:
      r = Row(check, "SKIP", f"the {BUDGET_S} s budget is spent")
    else:
      try:
        result, detail = fn()
        r = Row(check, result, detail)
      except subprocess.TimeoutExpired:
        r = Row(check, "SKIP", "stopped: the time budget ran out")
      except Exception as e:  # a failed check is a row, not a crash
        r = Row(check, "FAIL", f"{type(e).__name__}: {e}")
    r.seconds = time.monotonic() - t0
    self.rows.append(r)
    print(format_row(r), flush=True)
    return r


def identical(a: str, b: str) -> tuple[bool, str]:
  """Whether two workdirs hold the same metrics.csv and stream parameters, bitwise."""
  import numpy as np
  import jax
  from icldyn import api
  with open(os.path.join(a, "metrics.csv"), "rb") as f, open(os.path.join(b, "metrics.csv"), "rb") as g:
    if f.read() != g.read():
      return False, "metrics.csv differs"
  wa, wb = api.load(a), api.load(b)
  if wa.steps != wb.steps:
    return False, f"stream steps differ: {wa.steps} vs {wb.steps}"
  for step in wa.steps:
    for x, y in zip(jax.tree.leaves(wa.params(step)), jax.tree.leaves(wb.params(step))):
      if not np.array_equal(np.asarray(x), np.asarray(y)):
        return False, f"parameters differ at step {step}"
  return True, f"metrics.csv and {len(wa.steps)} stream checkpoints bitwise identical"


def metric_difference(a: str, b: str) -> tuple[float, float, int]:
  """(max |a - b|, max |a - b| / tolerance, count) over the continuous metrics of two workdirs."""
  import numpy as np
  import pandas as pd
  key = ["step", "run", "evaluator", "metric"]
  ma = pd.read_csv(os.path.join(a, "metrics.csv"), float_precision="round_trip")
  mb = pd.read_csv(os.path.join(b, "metrics.csv"), float_precision="round_trip")
  m = ma.merge(mb, on=key, suffixes=("_a", "_b"))
  if len(m) != len(ma) or len(m) != len(mb):
    raise RuntimeError("the two metrics.csv hold different rows")
  m = m[~m["metric"].str.startswith("acc")]
  va, vb = m["value_a"].to_numpy(), m["value_b"].to_numpy()
  both = np.isfinite(va) & np.isfinite(vb)
  if not np.array_equal(np.isfinite(va), np.isfinite(vb)):
    raise RuntimeError("a metric is finite on one backend only")
  diff = np.abs(va[both] - vb[both])
  allowed = TOLERANCE[0] + TOLERANCE[1] * np.abs(vb[both])
  return float(diff.max(initial=0.0)), float((diff / allowed).max(initial=0.0)), int(both.sum())


def format_row(r: Row) -> str:
  return f"{r.check:<22} {r.result:<5} {r.seconds:>7.1f}  {r.detail}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cpu", action="store_true",
                 help="check the CPU backend (otherwise a CPU backend fails the check)")
  p.add_argument("--small", action="store_true",
                 help="a tiny model and one bench size (the CPU test)")
  p.add_argument("--bench-sizes", default=None,
                 help="grid sizes of the bench rows (default 1,64,256,1024; --small: 1; '' none)")
  p.add_argument("--bench-steps", type=int, default=None,
                 help="timed steps per bench row, a multiple of 100 (default 400; --small 100)")
  p.add_argument("--workdir", default=None, help="where the workdirs go (default: a temporary "
                 "directory, removed afterwards)")
  p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
  p.add_argument("--cache", default=None,
                 help="with --small: the compilation cache every step shares (the tests' own)")
  args = p.parse_args(argv)
  sizes = args.bench_sizes if args.bench_sizes is not None else ("1" if args.small
                                                                 else "1,64,256,1024")
  steps = args.bench_steps or (100 if args.small else 400)

  # This process holds JAX too (the backend row, the matmul rate, comparing
  # checkpoints): without this it would reserve most of a GPU's memory and
  # leave the training subprocesses none.
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  if args.cpu:
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import jaxlib

  workdir = args.workdir or tempfile.mkdtemp(prefix="icldyn-gpu-check-")
  os.makedirs(workdir, exist_ok=True)
  c = Checker(workdir, args.cpu, args.small, args.budget, args.cache)
  backend = jax.default_backend()
  devices = jax.devices()
  print(f"icldyn gpu-check: jax {jax.__version__}, jaxlib {jaxlib.__version__}, backend "
        f"{backend}, {len(devices)} x {devices[0].device_kind}; study {STUDY}"
        f"{' (small)' if args.small else ''}; workdirs in {workdir}", flush=True)
  print(f"{'check':<22} {'':<5} {'seconds':>7}  detail")

  def check_backend():
    kinds = sorted({d.device_kind for d in devices})
    detail = f"{backend}: {len(devices)} device(s), {', '.join(kinds)}"
    if backend == "cpu" and not args.cpu:
      return "FAIL", (f"{detail}; JAX found no accelerator (a CPU build of JAX, or a GPU it "
                      "cannot see: make venv ACCEL=cuda12, nvidia-smi); --cpu checks the CPU")
    return "PASS", detail

  first = c.row("backend", check_backend)
  if first.result == "FAIL":
    return finish(c, workdir, args.workdir is None)

  def train_twice():
    c.train("a", "cache_a")
    c.train("b", "cache_b")
    ok, detail = identical(c.path("a"), c.path("b"))
    fresh = "" if c.small else " (each compiled afresh)"
    return ("PASS" if ok else "FAIL"), detail + fresh

  def kill_and_resume():
    killed = c.train("k", "cache_a", {"ICLDYN_FAULT": "after_checkpoint:1"}, check=False)
    if killed.returncode != -9:
      return "FAIL", f"the fault did not kill the training (exit {killed.returncode})"
    c.train("k", "cache_a")
    ok, detail = identical(c.path("a"), c.path("k"))
    return ("PASS" if ok else "FAIL"), "killed after the first checkpoint, resumed: " + detail

  def densify():
    proc = c.run(["icldyn", "densify", "--workdir", c.path("a"), "--window", "400:1200",
                  "--num", "4", "--quiet"], "cache_a", check=False)
    if proc.returncode != 0:
      return "FAIL", (proc.stderr.strip().splitlines() or ["?"])[-1]
    return "PASS", "re-ran 400..1200 sequences bit-identically, 4 dense checkpoints"

  def analyze_and_plot():
    c.run(["icldyn", "analyze", "--workdir", c.path("a"), "--quiet"], "cache_a")
    c.run(["icldyn", "plot", "--workdir", c.path("a")], "cache_a")
    figures = [f for f in os.listdir(os.path.join(c.path("a"), "plots")) if f.endswith(".png")]
    needed = [os.path.join("analysis", "phase_changes.csv"), "report.md"]
    missing = [n for n in needed if not os.path.exists(os.path.join(c.path("a"), n))]
    if missing or not figures:
      return "FAIL", f"missing: {missing or 'figures'}"
    return "PASS", f"phase_changes.csv, report.md, {len(figures)} figures"

  def against_cpu():
    c.train("cpu", "cache_cpu", {"JAX_PLATFORMS": "cpu"})
    worst, ratio, n = metric_difference(c.path("b"), c.path("cpu"))  # densify added rows to a
    same = "" if backend != "cpu" else " (CPU against CPU: this is the CPU check)"
    detail = (f"max |{backend} - cpu| {worst:.2e} over {n} metric values, {ratio:.2g} of the "
              f"tolerance ({TOLERANCE[0]:g} abs + {TOLERANCE[1]:g} rel){same}")
    return ("PASS" if ratio <= 1.0 else "FAIL"), detail

  c.row("train twice", train_twice)
  c.row("kill and resume", kill_and_resume)
  c.row("densify", densify)
  c.row("analyze and plot", analyze_and_plot)
  c.row("float32 vs CPU", against_cpu)

  peak = None
  for size in [s for s in sizes.split(",") if s.strip()]:
    def bench(size=int(size)):
      nonlocal peak
      if peak is None:
        peak = matmul_rate(backend)
      proc = c.run(["icldyn.bench", "--one", str(size), "--steps", str(steps), "--batch", "32"],
                   "cache_bench", check=True)
      r = json.loads([x for x in proc.stdout.splitlines() if x.startswith("BENCH ")][-1][6:])
      return "INFO", (f"{r['run_steps_per_s']:.0f} run-steps/s ({r['run_steps_per_s_with_eval']:.0f}"
                      f" with evaluation), {r['gflops_per_s']:.1f} GFLOP/s = "
                      f"{100 * r['gflops_per_s'] / peak:.1f} % of float32 matmul "
                      f"({peak:.0f} GFLOP/s), compile {r['compile_s']:.0f} s, "
                      f"{r['devices']} device(s)")
    c.row(f"bench {size} run{'s' if size != '1' else ''}", bench)
  return finish(c, workdir, args.workdir is None)


def matmul_rate(backend: str) -> float:
  """This device's float32 matrix-multiply rate (GFLOP/s), at full float32 precision."""
  import jax
  from icldyn import bench
  with jax.default_matmul_precision("float32"):
    return bench.matmul_gflops(n=1024 if backend == "cpu" else 8192)


def finish(c: Checker, workdir: str, remove: bool) -> int:
  failed = [r.check for r in c.rows if r.result == "FAIL"]
  skipped = [r.check for r in c.rows if r.result == "SKIP"]
  verdict = "FAIL: " + ", ".join(failed) if failed else "PASS"
  print(f"icldyn gpu-check: {verdict}" + (f" (skipped: {', '.join(skipped)})" if skipped else ""),
        flush=True)
  if remove:
    shutil.rmtree(workdir, ignore_errors=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
