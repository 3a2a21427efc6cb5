"""Benchmarks (`make bench`): grid throughput, compile time, peak memory, analysis speed.

Each grid size runs in its own process so that its peak memory (max RSS) is
its own. Figures printed, never asserted: speed targets live here, not in
unit tests.

    python -m icldyn.bench                 # the table
    python -m icldyn.bench --sizes 1,8,64 --steps 300
    python -m icldyn.bench --sizes '' --batches '' --end-to-end 0 --skip-analysis   # patching only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def paper_config(n_runs: int, batch: int, clamped: bool = False):
  """The paper model; `clamped` mixes 8 keep_head settings (n_runs / 8 seeds each)."""
  from icldyn.config import base_config
  c = base_config()
  with c.unlocked():
    c.train.batch_size = batch
    if clamped:
      c.grid = ("clamp.keep_head=0,1,2,3,4,5,6,7",
                f"seeds.init={','.join(map(str, range(max(n_runs // 8, 1))))}")
    else:
      c.grid = (f"seeds.init={','.join(map(str, range(n_runs)))}",)
  return c


def token_config(n_runs: int, batch: int):
  """The token task's model and data of `repeat_tokens:cpu` (2 layers, 4
  heads, d_model 32, 64 tokens, V 64, segment 14), `n_runs` seeds."""
  from icldyn import studies
  c = studies.load("repeat_tokens:cpu")
  with c.unlocked():
    c.train.batch_size = batch
    c.tokens.vocab_size = 64
    c.tokens.segment_len = 14
    c.grid = (f"seeds.init={','.join(map(str, range(n_runs)))}",)
  return c


def bench_config(task: str, n_runs: int, batch: int, clamped: bool = False):
  """The benchmarked config of a task ('fewshot': the paper model; 'tokens')."""
  return token_config(n_runs, batch) if task == "tokens" else paper_config(n_runs, batch, clamped)


def matmul_gflops(n: int = 1024, reps: int = 10, trials: int = 5) -> float:
  """Measured float32 matrix-multiply throughput of this machine (GFLOP/s).

  The best of `trials` timings of `reps` products: the reference is what the
  machine can do, and on a shared host a single timing read 102-134 GFLOP/s
  on different days, which moved every "% matmul" figure with it.
  """
  import jax
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
  f = jax.jit(lambda x: x @ x * (1.0 / n))
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(trials):
    t = time.perf_counter()
    for _ in range(reps):
      a = f(a)
    a.block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 * reps / best / 1e9


def sharded_group(cfg):
  """The first group of `cfg`'s grid placed on its devices as training places
  it (`icldyn.group.Placed`: mesh, padded props, shared arrays, programs)."""
  from icldyn import build, group as group_lib
  return group_lib.Placed(build.prepare(cfg).groups[0])


def bench_one(n_runs: int, steps: int, batch: int, clamped: bool = False,
              task: str = "fewshot") -> dict:
  """Times the grid chunk of a task's benchmark model for `n_runs` runs (this process)."""
  import jax
  from icldyn import step as train_lib
  cfg = bench_config(task, n_runs, batch, clamped)
  with cfg.unlocked():
    cfg.train.scan_steps = 100
  placed = sharded_group(cfg)
  pg, mesh, props, table = placed.prepared, placed.mesh, placed.props, placed.table
  t0 = time.perf_counter()
  state = placed.initial_state()
  chunk_c, eval_c = placed.compile_training(state)
  compile_s = time.perf_counter() - t0
  # XLA's cost analysis counts a scan's body once, so count one grid step on its own.
  one_step = jax.jit(jax.vmap(lambda st, pr, tb: train_lib.train_step(pg.static, tb, st, pr, 0)[0],
                              (0, 0, None)))
  cost = one_step.lower(state, props, table).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # The analysis of a program sharded over the mesh counts one device's share.
  flops_per_step = float(cost.get("flops", 0.0)) * mesh.devices.size
  state, out = chunk_c(state, props, table, 0, 100)  # warm-up
  jax.block_until_ready(out)
  # Median over chunks of 100 steps (and over 3 evaluations): the host may be
  # shared, and a median is robust to another process taking a core for a while.
  chunk_s = []
  done = 0
  while done < steps:
    t0 = time.perf_counter()
    state, out = chunk_c(state, props, table, 100 + done, 100)
    jax.block_until_ready(out)
    chunk_s.append(time.perf_counter() - t0)
    done += 100
  train_s = statistics.median(chunk_s) * len(chunk_s)
  eval_times = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(eval_c(state, props, table))
    eval_times.append(time.perf_counter() - t0)
  eval_s = statistics.median(eval_times)
  # Aggregate rate including one evaluation of 4 x 1000 sequences every 5000 sequences.
  eval_per_step = eval_s * batch / 5000
  return {
      "runs": n_runs, "compile_s": compile_s,
      "run_steps_per_s": n_runs * done / train_s,
      "run_steps_per_s_with_eval": n_runs * done / (train_s + eval_per_step * done),
      "gflops_per_s": flops_per_step * done / train_s / 1e9,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "devices": mesh.devices.size,
  }


def bench_end_to_end(n_runs: int, sequences: int, batch: int) -> dict:
  """`runner.train` of the paper model, everything included: evaluation every
  5000 sequences, checkpoints every 10000, resume checkpoint, metrics files.

  The program is compiled by a first, identical training into a scratch
  persistent compilation cache; the timed second training loads it from there
  (a second or two, counted in the time).
  """
  import tempfile
  import jax
  from icldyn import runner
  cfg = paper_config(n_runs, batch)
  with cfg.unlocked():
    cfg.train.num_sequences = sequences
    cfg.checkpoint.every = 10_000
    cfg.checkpoint.resume_every = sequences
  with tempfile.TemporaryDirectory() as tmp:
    jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    runner.train(cfg, os.path.join(tmp, "warm"), quiet=True)
    seconds = runner.train(cfg, os.path.join(tmp, "timed"), quiet=True)["seconds"]
  steps = -(-sequences // batch)
  return {"runs": n_runs, "run_steps_per_s_end_to_end": n_runs * steps / seconds,
          "seconds": seconds}


def bench_loop(steps: int, batch: int, task: str = "fewshot") -> float:
  """One run, one jitted step per Python iteration (the icl-dynamics way): steps/s."""
  import jax
  from icldyn import build, step as train_lib
  pg = build.prepare(bench_config(task, 1, batch)).groups[0]
  props = jax.tree.map(lambda x: jax.numpy.asarray(x[0]), pg.props)
  table = jax.tree.map(jax.numpy.asarray, pg.table)
  step = jax.jit(lambda st, t: train_lib.train_step(pg.static, table, st, props, t)[0])
  state = jax.jit(lambda: train_lib.init_state(pg.static, props))()
  state = step(state, 0)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for t in range(1, steps + 1):
    state = step(state, t)
  jax.block_until_ready(state)
  return steps / (time.perf_counter() - t0)


def bench_patching(n_runs: int = 64, checkpoints: int = 50, size: int = 128, block: int = 5,
                   circuit_edges: int = 0) -> dict:
  """`icldyn patch`'s path-patching matrix of the paper model (every layer-0 head to
  every layer-1 head through q, k, v: 8 x 8 x 3, and all 16 heads to the
  logits) for `n_runs` runs x `checkpoints` checkpoints, in memory: random
  parameters per run, scaled per checkpoint; reading checkpoints and
  writing the CSV are not timed. Compile time apart. With `circuit_edges`,
  the edge-level circuit scores (`core.edge_scores`, 8 sampled subsets) of a
  circuit of that many edges per run over the same stream instead.

  Besides wall times, the process's CPU time over each timed part: on a
  host whose 2 cores are shared, CPU seconds / wall seconds says how much of
  the machine the benchmark got (2.0: both cores throughout)."""
  import jax
  import numpy as np
  from icldyn import build, model as model_lib
  from icldyn.patching import core, program
  pg = build.prepare(paper_config(n_runs, 32)).groups[0]
  spec = pg.static.model
  params = jax.device_get(jax.vmap(lambda s: model_lib.init_params(spec, s))(
      np.asarray(pg.props.init_seed)))
  data = program.put(program.make_data(pg.static, pg.table, pg.props, None, size))
  stacked = lambda k: program.stack_block(  # noqa: E731
      [jax.tree.map(lambda x: x * (1 + 0.01 * (k + j)), params) for j in range(block)], block)
  blocks = [stacked(k) for k in range(0, checkpoints, block)]

  def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

  def timed(fn, *args) -> dict:
    t, c = time.perf_counter(), cpu()
    jax.block_until_ready(fn(blocks[0], *args))
    compile_s = time.perf_counter() - t
    per, t, c = [], time.perf_counter(), cpu()
    for b in blocks:
      t1 = time.perf_counter()
      jax.block_until_ready(fn(b, *args))
      per.append(time.perf_counter() - t1)
    wall = time.perf_counter() - t
    return {"s": wall, "compile_s": compile_s, "cpu_s": cpu() - c,
            "block_median_s": statistics.median(per), "block_max_s": max(per)}

  out = {"edges": 8 * 8 * 3 + 16, "runs": n_runs, "checkpoints": checkpoints, "size": size,
         "block": block}
  if not circuit_edges:
    path = timed(program.path_program(pg.static, core.Edges.every(spec)), data)
    out.update({"patching_s": path["s"], "compile_s": path["compile_s"], "cpu_s": path["cpu_s"],
                "block_median_s": path["block_median_s"], "block_max_s": path["block_max_s"]})
  else:
    every = np.asarray(core.flat_edges(core.every_edge(spec)))
    valid = np.nonzero(every)[0]
    pick = valid[np.linspace(0, len(valid) - 1, circuit_edges).astype(int)]
    masks = np.zeros((n_runs, every.size), bool)
    masks[:, pick] = True
    index = np.broadcast_to(pick.astype(np.int32), (n_runs, circuit_edges)).copy()
    sc = timed(program.edge_circuit_program(pg.static), data, masks, index)
    out.update({"circuit_edges": circuit_edges, "scores_s": sc["s"],
                "scores_compile_s": sc["compile_s"], "scores_cpu_s": sc["cpu_s"]})
  return out


def _child(args) -> None:
  import jax
  if args.patching_child:
    out = bench_patching(args.one, args.patching, circuit_edges=args.circuit_edges)
  elif args.one == 0:
    out = {"loop_steps_per_s": bench_loop(args.steps, args.batch, args.task)}
    if args.task == "fewshot":
      out["matmul_gflops"] = matmul_gflops()
  elif args.e2e_child:
    out = bench_end_to_end(args.one, args.end_to_end, args.batch)
  else:
    out = bench_one(args.one, args.steps, args.batch, args.clamped, args.task)
  out.setdefault("devices", len(jax.devices()))
  print("BENCH " + json.dumps(out))


def _run_child(flag: list[str], env: dict) -> dict:
  proc = subprocess.run([sys.executable, "-m", "icldyn.bench"] + flag, capture_output=True,
                        text=True, env=env)
  for line in proc.stdout.splitlines():
    if line.startswith("BENCH "):
      return json.loads(line[6:])
  raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-2000:]}")


def _row(label: str, r: dict, loop: float, peak: float) -> str:
  return (f"{label:>9} {r['devices']:>4} {r['run_steps_per_s']:>12.0f} "
          f"{r['run_steps_per_s_with_eval']:>9.0f} {r['run_steps_per_s'] / loop:>7.1f} "
          f"{r['gflops_per_s']:>8.1f} {100 * r['gflops_per_s'] / peak:>8.1f}% "
          f"{r['compile_s']:>10.1f} {r['peak_rss_mb']:>8.0f}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="1,8,64,64c,256,64t",
                 help="grid sizes; a trailing 'c' mixes 8 keep_head clamp settings, a "
                      "trailing 't' is the token task (repeat_tokens:cpu model)")
  p.add_argument("--batches", default="8,16,64,128",
                 help="batch sizes (besides --batch) timed at 64 runs; '' for none")
  p.add_argument("--steps", type=int, default=300, help="timed steps per grid size")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--end-to-end", type=int, default=40_000, metavar="SEQUENCES",
                 help="sequences of the end-to-end 64-run training (0: skip)")
  p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--clamped", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--task", default="fewshot", help=argparse.SUPPRESS)
  p.add_argument("--e2e-child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--skip-analysis", action="store_true")
  p.add_argument("--patching", type=int, default=50, metavar="CHECKPOINTS",
                 help="checkpoints of the 64-run path-patching benchmark (0: skip)")
  p.add_argument("--patching-child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--circuit-edges", type=int, default=0, help=argparse.SUPPRESS)
  # Off by default: 64 runs x 5 checkpoints had not finished after 14 min
  # (27 CPU-minutes, 7 GB) on this 2-core CPU (docs/performance.md).
  p.add_argument("--scores", type=int, default=0, metavar="CHECKPOINTS",
                 help="checkpoints of a 64-run edge-level circuit-score benchmark, a "
                      "10-edge circuit per run (default 0: skipped; slow on a CPU)")
  args = p.parse_args(argv)
  if args.one is not None:
    _child(args)
    return
  # Children run as the `icldyn` command does: one XLA CPU device per core
  # (ICLDYN_CPU_DEVICES overrides); the loop baseline is one run on one device.
  from icldyn import sharding
  env = dict(os.environ)
  sharding.configure_cpu_devices(env)
  one_env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  print(f"icldyn bench: paper model (2 layers, 8 heads, d_model 64, 512-dim inputs, context 2), "
        f"batch {args.batch}, {os.cpu_count()} CPU cores", flush=True)
  base = _run_child(["--one", "0", "--steps", str(args.steps), "--batch", str(args.batch)],
                    one_env)
  loop, peak = base["loop_steps_per_s"], base["matmul_gflops"]
  print(f"one run, one jitted step per Python iteration: {loop:.0f} steps/s; "
        f"float32 matmul: {peak:.1f} GFLOP/s", flush=True)
  head = (f"{'runs':>9} {'dev':>4} {'run-steps/s':>12} {'w/ eval':>9} {'x loop':>7} "
          f"{'GFLOP/s':>8} {'% matmul':>9} {'compile s':>10} {'peak MB':>8}")
  print(head)
  print("-" * len(head))
  # 64c: 64 runs mixing 8 keep_head clamp settings in one program. A grid
  # without clamps compiles the unclamped program itself (no clamp sites), so
  # an unused clamp site costs nothing by construction.
  token_loop = None
  for size in [x for x in args.sizes.split(",") if x.strip()]:
    clamped, tokens = size.endswith("c"), size.endswith("t")
    n = int(size.rstrip("ct"))
    flags = ["--one", str(n), "--steps", str(args.steps), "--batch", str(args.batch)]
    if tokens and token_loop is None:
      # The token model's own one-run loop, in this invocation, for its ratio.
      token_loop = _run_child(["--one", "0", "--task", "tokens"] + flags[2:],
                              one_env)["loop_steps_per_s"]
    r = _run_child(flags + (["--clamped"] if clamped else [])
                   + (["--task", "tokens"] if tokens else []), env)
    print(_row(size, r, token_loop if tokens else loop, peak), flush=True)
  if token_loop is not None:
    print(f"  {'t':>7}: the token task (2 layers, 4 heads, d_model 32, 64 tokens, V 64, "
          f"segment 14, 4 copies); its x loop is against its own loop, {token_loop:.1f} steps/s", flush=True)
  for b in [int(x) for x in args.batches.split(",") if x.strip()]:
    # Run-steps of a different batch size are a different amount of work:
    # the ratio to the loop is against the loop at batch 32.
    r = _run_child(["--one", "64", "--steps", str(args.steps), "--batch", str(b)], env)
    print(_row(f"64 b{b}", r, loop, peak), flush=True)
  if args.end_to_end:
    r = _run_child(["--one", "64", "--e2e-child", "--end-to-end", str(args.end_to_end),
                    "--batch", str(args.batch)], env)
    rate = r["run_steps_per_s_end_to_end"]
    print(f"end to end, 64 runs x {args.end_to_end} sequences (runner.train: evaluation every "
          f"5000 sequences, checkpoints, metrics): {rate:.0f} run-steps/s = {rate / loop:.1f} x "
          f"loop ({r['seconds']:.1f} s, {r['devices']} devices)", flush=True)
  if args.patching:
    load = os.getloadavg()[0]
    r = _run_child(["--one", "64", "--patching-child", "--patching", str(args.patching)], env)
    load = max(load, os.getloadavg()[0])
    print(f"path patching (icldyn patch), 64 runs x {r['checkpoints']} checkpoints x "
          f"{r['edges']} edges, {r['size']} sequences: {r['patching_s']:.1f} s "
          f"(target <= 300 s; + {r['compile_s']:.1f} s compiling; {r['devices']} devices; "
          f"{r['cpu_s'] / r['patching_s']:.2f} of {os.cpu_count()} cores busy, 1-min load "
          f"average up to {load:.1f}; {r['block_median_s']:.1f} s per block of {r['block']} "
          f"checkpoints, median)", flush=True)
  if args.scores:
    r = _run_child(["--one", "64", "--patching-child", "--patching", str(args.scores),
                    "--circuit-edges", "10"], env)
    print(f"circuit scores, edge level (icldyn patch), 64 runs x {r['checkpoints']} checkpoints, "
          f"{r['circuit_edges']} edges per run, 8 subsets, {r['size']} sequences: "
          f"{r['scores_s']:.1f} s (+ {r['scores_compile_s']:.1f} s compiling; "
          f"{r['scores_cpu_s'] / r['scores_s']:.2f} cores busy)", flush=True)
  if not args.skip_analysis:
    try:
      from icldyn import bench_analysis
    except ImportError:
      print("analysis benchmark: not available")
    else:
      bench_analysis.main()


if __name__ == "__main__":
  main()
