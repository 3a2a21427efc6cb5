"""Benchmark of `icldyn analyze`: 64 runs x 200 checkpoints of the paper model.

    python -m icldyn.bench_analysis [--runs 64] [--checkpoints 200] [--measures M,...]
                                    [--keep DIR]

Builds a synthetic workdir in a temporary directory: the paper model (2
layers, 8 heads, d_model 64, 512-dim inputs, 5 labels; `base_config()`)
in one group of `runs` runs (`seeds.init` x `train.learning_rate`), a
checkpoint stream of `checkpoints` steps 5000 sequences apart holding
random parameters (each checkpoint a different rotation between two random
parameter draws), and a metrics.csv with every metric training logs at
every 5000 sequences, the fsl_train loss and one head's induction strength
of each run following a sigmoid in log time. Then it times `analyze` on it
(default measures and curves unless --measures is given) and prints the
figure. Building the workdir is not timed (about a minute: orbax writes
~17 MB per checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

from icldyn import build
from icldyn import config as config_lib
from icldyn import model as model_lib
from icldyn import runner
from icldyn.store import checkpoints as ckpt_lib
from icldyn.store import files as wd_lib
from icldyn.tasks import fewshot

EVERY = 5000  # sequences between checkpoints and evaluations
LIMIT_S = 60.0


def _grid(runs: int) -> list[str]:
  lrs = 4 if runs % 4 == 0 else 1
  seeds = runs // lrs
  axes = [f"seeds.init={','.join(str(s) for s in range(seeds))}"]
  if lrs > 1:
    axes.append("train.learning_rate=1e-5,2e-5,4e-5,8e-5")
  return axes


def build_workdir(path: str, runs: int = 64, checkpoints: int = 200, seed: int = 0) -> None:
  """Writes a synthetic trained workdir (see the module docstring)."""
  cfg = config_lib.base_config()
  with cfg.unlocked():
    cfg.train.num_sequences = EVERY * checkpoints
  prepared = build.prepare(cfg, _grid(runs))
  pg = prepared.groups[0]
  os.makedirs(path, exist_ok=True)
  wd_lib.write_json(os.path.join(path, wd_lib.CONFIG_JSON), prepared.resolved())
  wd_lib.write_runs(os.path.join(path, wd_lib.RUNS_CSV),
                    runner.run_rows(prepared, {r: ("done", -1) for r in range(runs)}))

  # Two independent initialisations; checkpoint k lies on the circle between them.
  init = jax.jit(jax.vmap(lambda s: model_lib.init_params(pg.static.model, s)))
  a = jax.device_get(init(pg.props.init_seed))
  b = jax.device_get(init(pg.props.init_seed + np.uint32(1000)))
  store = ckpt_lib.Store(path, 0)
  steps = [EVERY * (k + 1) for k in range(checkpoints)]
  for k, step in enumerate(steps):
    theta = 0.5 * math.pi * k / max(checkpoints - 1, 1)
    store.save_params(step, jax.tree.map(
        lambda x, y: (math.cos(theta) * x + math.sin(theta) * y).astype(np.float32), a, b))
  store.close()
  _write_metrics(os.path.join(path, wd_lib.METRICS_CSV), pg.group.runs, [0] + steps,
                 pg.static.model.num_heads, seed)


def _write_metrics(path: str, runs: list[int], steps: list[int], heads: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  x = np.log(np.maximum(np.asarray(steps, np.float64), 1.0))
  names = [(e, m) for e in fewshot.EVALUATORS
           for m in fewshot.EVAL_METRICS]
  names += [("fsl_train", f"{k}.h{h}") for k in ("induction_strength", "prev_token")
            for h in range(heads)]
  names += [("train", "loss"), ("train", "grad_norm")]
  lines = [",".join(wd_lib.METRICS_HEADER)]
  mids = {r: math.log(rng.uniform(1e5, 6e5)) for r in runs}
  for i, step in enumerate(steps):
    for e, m in sorted(names):
      for r in runs:
        rise = 1.0 / (1.0 + math.exp(-4.0 * (x[i] - mids[r])))
        if m == "loss":
          v = math.log(2) * (1.0 - 0.9 * rise)
        elif m == f"induction_strength.h{r % heads}":
          v = 0.9 * rise
        else:
          v = 0.5
        v += 0.01 * rng.standard_normal()
        if step == 0 and e == "train":
          continue
        lines.append(f"{step},{r},{e},{m},{v:.9g}")
  wd_lib.atomic_write(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m icldyn.bench_analysis",
                              description=__doc__.split("\n")[0])
  p.add_argument("--runs", type=int, default=64)
  p.add_argument("--checkpoints", type=int, default=200)
  p.add_argument("--measures", default=None,
                 help="as icldyn analyze --measures (default: the defaults)")
  p.add_argument("--keep", default=None, help="build (or reuse) the workdir here and keep it")
  args = p.parse_args([] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
  for noisy in ("absl", "orbax", "jax", "etils"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  logging.getLogger("icldyn").setLevel(logging.INFO)

  from icldyn.analysis import command
  tmp = None
  path = args.keep
  if path is None:
    tmp = tempfile.mkdtemp(prefix="icldyn_bench_analysis_")
    path = tmp
  try:
    if not os.path.isfile(os.path.join(path, wd_lib.METRICS_CSV)):
      t = time.time()
      build_workdir(path, args.runs, args.checkpoints)
      print(f"built the synthetic workdir in {time.time() - t:.0f}s: {path}", file=sys.stderr)
    t = time.time()
    result = command.analyze(path, measures=args.measures, quiet=True)
    seconds = time.time() - t
    size = os.path.getsize(result["progress"]) / 2**20
    print(f"icldyn analyze: {args.runs} runs x {result['checkpoints']} checkpoints, measures "
          f"{','.join(result['measures']) or 'none'}, {len(result['curves'])} curves: "
          f"{seconds:.1f}s on {os.cpu_count()} CPU core(s) (target <= {LIMIT_S:.0f}s); "
          f"progress.csv {size:.0f} MiB")
    return 0 if seconds <= LIMIT_S else 1
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
