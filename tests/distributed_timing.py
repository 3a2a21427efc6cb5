"""Times one grid on 1 process x 2 devices against 2 processes x 1 device, and the parts.

Not a test (pytest does not collect it): the measurement behind
docs/performance.md, "Several processes". Run from the repository root:

    JAX_PLATFORMS=cpu .venv/bin/python tests/distributed_timing.py --repeats 5

It trains tests/test_distributed.py's 3-run grid (XLA at optimisation level
0, as in the tests) in both layouts, alternating, after one warm-up of each,
and prints each run's wall time, its compile line and loop rate, and the
load average before it. The study imports tests/conftest.py, so every
process uses the tests' persistent compilation cache (.jax_cache). Then
the multi-process path's parts, each in 2 fresh processes: Python and JAX
start-up alone, `distributed.initialize` (coordination service and join),
the first exchange (gloo connects), then the per-chunk exchange
(`first_signal`) and the gathering of a 98 KB tree (`to_host`).
Medians at the end.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_distributed as td  # noqa: E402  (sets XLA_FLAGS as the tests do)

from icldyn import distributed  # noqa: E402
from icldyn.sharding import CPU_DEVICES_ENV  # noqa: E402

PARTS = """
import json, os, sys, time
t0 = float(sys.argv[1])
import jax, numpy as np
t_import = time.time() - t0
from icldyn import distributed
t = time.time(); distributed.initialize(); t_init = time.time() - t
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("run",))
t = time.time(); distributed.first_signal(None); t_first = time.time() - t
signal_s = []
for _ in range(int(sys.argv[2])):
  t = time.time(); distributed.first_signal(None); signal_s.append(time.time() - t)
# 4 runs (3 padded to 4) x 8 leaves of 16 x 48 float32: 98 KB, sharded over the runs.
host = np.ones((4, 16, 48), np.float32)
tree = {f"w{i}": jax.make_array_from_callback(host.shape, NamedSharding(mesh, P("run")),
                                              lambda index: host[index]) for i in range(8)}
distributed.to_host(tree)  # compiles the replicating program
gather_s = []
for _ in range(20):
  t = time.time(); distributed.to_host(tree); gather_s.append(time.time() - t)
if jax.process_index() == 0:
  print(json.dumps({"import": t_import, "initialize": t_init, "first exchange": t_first,
                    "per-chunk exchange": float(np.median(signal_s)),
                    "gather a tree": float(np.median(gather_s))}))
os._exit(0)
"""


def _load() -> str:
  return "%.2f %.2f %.2f" % os.getloadavg()


def env(devices: int, **extra) -> dict:
  """The tests' subprocess environment (tests/test_distributed.py), plus `extra`."""
  out = dict(os.environ)
  out["PYTHONPATH"] = td.ROOT + os.pathsep + out.get("PYTHONPATH", "")
  out[CPU_DEVICES_ENV] = str(devices)
  for k in ("ICLDYN_FAULT", distributed.ADDRESS_ENV, distributed.COUNT_ENV, distributed.ID_ENV):
    out.pop(k, None)
  out.update({k: str(v) for k, v in extra.items()})
  return out


def train(study: str, processes: int, devices: int) -> dict:
  """One training in a fresh workdir; wall time and process 0's progress lines."""
  wd = tempfile.mkdtemp()
  cmd = [sys.executable, "-m", "icldyn", "train", "--config", study, "--workdir", wd + "/w"]
  if processes > 1:
    cmd += ["--local-processes", str(processes)]
  load, t = _load(), time.monotonic()
  out = subprocess.run(cmd, env=env(devices), cwd=td.ROOT, capture_output=True, text=True,
                       timeout=td.TIMEOUT)
  wall = time.monotonic() - t
  assert out.returncode == 0, out.stderr[-3000:]
  compiled = re.search(r"compiled in ([\d.]+)s", out.stderr)
  rate = re.findall(r"(\d+) seq/s/run", out.stderr)
  return {"wall": wall, "compile": float(compiled.group(1)) if compiled else None,
          "rate": int(rate[-1]) if rate else None, "load": load}


def parts(repeats: int, exchanges: int) -> list[dict]:
  """The multi-process path's parts, each repeat in 2 fresh processes."""
  rows = []
  for _ in range(repeats):
    address = f"127.0.0.1:{distributed.free_port()}"
    envs = [env(1, **{distributed.ADDRESS_ENV: address, distributed.COUNT_ENV: 2,
                      distributed.ID_ENV: i}) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", PARTS, str(time.time()), str(exchanges)],
                              env=env, cwd=td.ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for env in envs]
    outs = [p.communicate(timeout=td.TIMEOUT)[0] for p in procs]
    last = (outs[0].strip().splitlines() or [""])[-1]  # gloo prints its own lines first
    rows.append(json.loads(last) if last.startswith("{") else {"failed": outs})
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--exchanges", type=int, default=200)
  args = ap.parse_args()
  tmp = tempfile.mkdtemp()
  study = os.path.join(tmp, "dist_study.py")
  with open(study, "w") as f:
    f.write(td.STUDY)
  layouts = {"1 process x 2 devices": (1, 2), "2 processes x 1 device": (2, 1)}
  print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
  for name, (p, d) in layouts.items():
    print(f"warm-up {name}: {train(study, p, d)}", flush=True)
  runs = {name: [] for name in layouts}
  for r in range(args.repeats):
    for name, (p, d) in layouts.items():
      runs[name].append(train(study, p, d))
      print(f"{r} {name}: {runs[name][-1]}", flush=True)
  found = parts(args.repeats, args.exchanges)
  for row in found:
    print(f"parts: {row}", flush=True)
  print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
  for name, rows in runs.items():
    med = {k: statistics.median(r[k] for r in rows) for k in ("wall", "compile", "rate")}
    print(f"median {name}: wall {med['wall']:.1f} s, compile line {med['compile']:.1f} s, "
          f"loop {med['rate']} seq/s/run")
  ok = [r for r in found if "failed" not in r]
  for k in ("import", "initialize", "first exchange", "per-chunk exchange", "gather a tree"):
    print(f"median part {k}: {statistics.median(r[k] for r in ok) * 1e3:.1f} ms")


if __name__ == "__main__":
  main()
