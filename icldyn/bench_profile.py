"""Where a grid step's time goes: the profile behind docs/performance.md.

    python -m icldyn.bench_profile              # 64 runs, batch 32, 50 steps
    python -m icldyn.bench_profile --runs 8 --top 30

Traces one compiled chunk of training steps of the paper model with
`jax.profiler`, sums each XLA operation's time over every device thread, and
joins the operations to the optimised HLO of the chunk, whose `op_name`
metadata says which part of the model each one computes. Prints the time per
step by part (dots, the attention's elementwise work, LayerNorm, the
optimizer, the norms, sampling, the guard and its state copies, layout
transposes, XLA's reduce-window rewrites) and the slowest operations. Op time
is summed over device threads, so with 2 devices busy all the time it is
about twice the wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

# Parts of a step, in the order the rules are tried (first match wins).
PARTS = ("dots", "attention elementwise", "layer norm", "embedding elementwise",
         "optimizer", "norms", "sampling", "guard, state copies", "layout transposes",
         "reduce-window", "other")


def _scope(op_name: str, scope: str) -> bool:
  """Whether `op_name` is inside `jax.named_scope(scope)` (as `/scope/` or, under vmap, `(scope)`)."""
  return re.search(rf"[(/]{scope}[)/]", op_name) is not None


def categorize(name: str, op_name: str) -> str:
  """The part of a step an XLA operation belongs to.

  Args:
    name: the HLO instruction's name (`ynn_fusion.22`, `copy.818`, ...).
    op_name: its `op_name` metadata, the JAX name stack ('' if none). The
      model's modules and the named scopes of `step` (sample, optimizer,
      norms, guard) appear in it.
  """
  if op_name.endswith("dot_general") or re.match(r"(ynn_fusion|dot)(\.|$)", name):
    return "dots"
  if "/attn/" in op_name:
    return "attention elementwise"
  if re.search(r"/ln(_final|_mlp)?/", op_name):
    return "layer norm"
  if "/embed" in op_name or "/unembed" in op_name:
    return "embedding elementwise"
  for scope, part in (("optimizer", "optimizer"), ("norms", "norms"), ("sample", "sampling"),
                      ("guard", "guard, state copies")):
    if _scope(op_name, scope):
      return part
  if re.match(r"(wrapped_)?copy(\.|$)", name) and not op_name:
    # Copies XLA inserts with no source: the divergence guard's conditional
    # copies the kept state into its own result buffers (docs/performance.md).
    return "guard, state copies"
  if name.startswith("transpose") or (re.match(r"\w*transpose\w*_fusion", name)
                                       and op_name.endswith("shard_map")):
    return "layout transposes"
  if "reduce-window" in name:
    return "reduce-window"
  return "other"


def op_times(trace_file: str) -> collections.Counter:
  """Total microseconds per operation name in a `jax.profiler` trace.json(.gz)."""
  opener = gzip.open if trace_file.endswith(".gz") else open
  with opener(trace_file, "rt") as f:
    events = json.load(f)["traceEvents"]
  out = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      out[e["name"]] += e["dur"]
  return out


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """{instruction name: (opcode, result shape, op_name)} of an HLO module's text."""
  ops = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\S+) ([\w\-]+)\((.*)$", hlo_text, re.M):
    name, shape, opcode, rest = m.groups()
    op = re.search(r'op_name="([^"]*)"', rest)
    ops[name] = (opcode, shape, op.group(1) if op else "")
  return ops


def breakdown(times: collections.Counter, ops: dict, steps: int) -> tuple[dict, list]:
  """Milliseconds per step by part, and every operation's row, slowest first.

  Only operations of the HLO that do work count: control flow (`while`,
  `conditional`, `call`) contains the others, and events that are not HLO
  operations (the executable, the host) are left out.
  """
  parts = dict.fromkeys(PARTS, 0.0)
  rows = []
  for name, us in times.items():
    if name not in ops or ops[name][0] in ("while", "conditional", "call"):
      continue
    _, shape, op_name = ops[name]
    part = categorize(name, op_name)
    ms = us / steps / 1e3
    parts[part] += ms
    rows.append((ms, name, shape, part, op_name))
  rows.sort(reverse=True)
  return parts, rows


def profile_chunk(cfg, steps: int) -> dict:
  """Traces `steps` training steps of the first group of `cfg`'s grid.

  Returns:
    {"runs", "steps", "devices", "wall_ms_per_step", "parts": {part: ms per
    step}, "rows": [(ms per step, name, shape, part, op_name)] slowest first}.
  """
  import jax
  from icldyn import bench
  cfg = cfg.copy_and_resolve_references()  # the caller's config stays as it was
  with cfg.unlocked():
    cfg.train.scan_steps = steps
  placed = bench.sharded_group(cfg)
  pg, mesh, props, table = placed.prepared, placed.mesh, placed.props, placed.table
  state = placed.init(props)
  chunk_c, _ = placed.compile_training(state)
  state, out = chunk_c(state, props, table, 0, steps)  # warm-up
  jax.block_until_ready(out)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      t0 = time.perf_counter()
      state, out = chunk_c(state, props, table, steps, steps)
      jax.block_until_ready(out)
      wall = time.perf_counter() - t0
    files = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
    if not files:
      raise RuntimeError(f"jax.profiler wrote no trace.json.gz under {tmp}")
    times = op_times(files[0])
  parts, rows = breakdown(times, hlo_ops(chunk_c.as_text()), steps)
  return {"runs": len(pg.group.runs), "steps": steps, "devices": mesh.devices.size,
          "wall_ms_per_step": wall / steps * 1e3, "parts": parts, "rows": rows}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--runs", type=int, default=64)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=50, help="traced steps (one compiled chunk)")
  p.add_argument("--top", type=int, default=15, help="slowest operations to list")
  args = p.parse_args(argv)
  for k in ("runs", "batch", "steps"):
    if getattr(args, k) < 1:
      p.error(f"--{k} must be at least 1")
  # One XLA CPU device per core, as `icldyn train` and `make bench` run.
  from icldyn import sharding
  sharding.configure_cpu_devices(os.environ)
  print(f"icldyn bench_profile: {args.runs} runs, batch {args.batch}, tracing {args.steps} "
        "steps (compiling first)...", flush=True)
  from icldyn import bench
  r = profile_chunk(bench.paper_config(args.runs, args.batch), args.steps)
  total = sum(r["parts"].values())
  print(f"wall {r['wall_ms_per_step']:.1f} ms per step on {r['devices']} device(s); "
        f"op time {total:.1f} ms per step, summed over device threads")
  print(f"{'part':<26} {'ms/step':>8} {'share':>6}")
  for part in PARTS:
    ms = r["parts"][part]
    print(f"{part:<26} {ms:>8.2f} {100 * ms / total if total else 0:>5.1f}%")
  print(f"\nslowest {args.top} operations (ms per step, summed over devices):")
  for ms, name, shape, part, op_name in r["rows"][:args.top]:
    print(f"{ms:7.2f}  {name:<30} {shape[:34]:<34} {part:<24} {op_name[-60:]}")


if __name__ == "__main__":
  main()
