"""`icldyn patch`: the path-patching matrix at every checkpoint of every run, edge timing, circuit scores.

    patch(workdir, corruption=None, senders=None, receivers=None, inputs='q,k,v', ...)
    writes (docs/interfaces.md)
      DIR/analysis/patching.csv        step,run,sender,receiver,input,metric,value
      DIR/analysis/circuit.csv         step,run,level,score,node,value
      DIR/analysis/patching.json       the settings and each run's circuit edges
    and adds one curve per circuit edge to DIR/analysis/phase_changes.csv
    (`patching/L0H3->L1H5.k`, `patching/L1H5->logits`; rows of an earlier
    `icldyn patch` are replaced, every other row is kept).

patching.csv: `sender` is `L{l}H{h}`; `receiver` is `L{l}H{h}` (with `input`
q, k or v) or `logits` (the direct path, empty `input`); `value` is the
effect F(patched) - F(clean) of path patching (noising, Wang et al. 2022,
arXiv 2211.00593; `icldyn.patching.core`) for `metric` in logit_diff, loss,
acc. Two rows per step, run and metric hold the unpatched runs: sender
`clean` and sender `corrupted`, empty receiver and input, value the metric
itself.

The circuit of a run is a list of edges: given (`circuit=`, the same for
every run), or by default the edges whose logit-difference effect at the
last checkpoint is at least `threshold` times the run's largest one in
magnitude. It is scored at every checkpoint by faithfulness, completeness
and per-edge minimality with every edge outside it mean-ablated path by
path (`core.edge_scores`, level `edges`, the default); `scores='heads'`
(or 'both') also scores its nodes, the heads in its edges, with every
other head knocked out (`core.circuit_scores`, level `heads`).

Every pass runs under the runs' training clamps (`clamped=True`, the
default): a run trained with a clamped head is patched as the model that
was trained, the clamped entries fixed as in training (`core.forward`);
`clamped=False` patches the same parameters without them. Each circuit edge's curve, its effect divided by
its effect at the last checkpoint, is timed as a rising curve (level 0.5:
when the edge carries half its final effect) by every estimator of
`icldyn.analysis.timing`, so "when did edge L0H3 -> L1H5 (k) form" is a row of
phase_changes.csv.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Sequence

import numpy as np

from icldyn import config as config_lib
from icldyn import results
from icldyn.analysis import command as analysis_command
from icldyn.analysis import loader
from icldyn.errors import ConfigError
from icldyn.patching import core
from icldyn.patching import program as program_lib
from icldyn.store import files as wd_lib
from icldyn.tasks import corrupt as corrupt_lib

log = logging.getLogger(__name__)

SOURCE = wd_lib.PATCHING_CURVE_PREFIX.rstrip("/")  # curve source of the edge timings
LOGITS = "logits"
PATCHING_JSON = wd_lib.PATCHING_JSON
SIZE = 128  # sequences per run in the clean and corrupted batches
SCORE_LEVELS = ("edges", "heads", "both", "none")
THRESHOLD = 0.2  # default circuit: edges with |final effect| >= this share of the largest
LEVEL = 0.5  # an edge has formed when it carries this share of its final effect


def head_name(layer: int, head: int) -> str:
  return f"L{layer}H{head}"


def edge_name(sender: str, receiver: str, inp: str) -> str:
  """`L0H3->L1H5.k`, `L1H5->logits`."""
  return f"{sender}->{receiver}" + (f".{inp}" if inp else "")


_HEAD = re.compile(r"^L(\d+|\*)H(\d+|\*)$")
_EDGE = re.compile(r"^(L\d+H\d+)->(L\d+H\d+\.[qkv]|logits)$")


def parse_heads(text: str | Sequence[str] | None, spec, field: str) -> list[tuple[int, int]] | None:
  """Heads from `L1H3,L0H*` (None: every head). Raises ConfigError naming `field`."""
  if text is None:
    return None
  items = text.split(",") if isinstance(text, str) else list(text)
  out: list[tuple[int, int]] = []
  for item in (i.strip() for i in items if i.strip()):
    m = _HEAD.match(item)
    if not m:
      raise ConfigError(field, f"expected heads like L1H3 or L0H* (comma-separated), got {item!r}")
    layers = range(spec.num_layers) if m[1] == "*" else [int(m[1])]
    heads = range(spec.num_heads) if m[2] == "*" else [int(m[2])]
    for l in layers:
      for h in heads:
        if not (0 <= l < spec.num_layers and 0 <= h < spec.num_heads):
          raise ConfigError(field, f"{item}: the model has layers 0-{spec.num_layers - 1} and "
                            f"heads 0-{spec.num_heads - 1}")
        if (l, h) not in out:
          out.append((l, h))
  if not out:
    raise ConfigError(field, "no heads given")
  return out


def parse_inputs(text: str | Sequence[str]) -> tuple[str, ...]:
  items = [i.strip() for i in (text.split(",") if isinstance(text, str) else text) if i.strip()]
  bad = [i for i in items if i not in core.INPUTS]
  if bad or not items:
    raise ConfigError("--inputs", f"receiver inputs are q, k, v (comma-separated), got {text!r}")
  return tuple(i for i in core.INPUTS if i in items)


def parse_circuit(text: str | Sequence[str] | None, spec) -> list[str] | None:
  """Edges `L0H3->L1H5.k,L1H5->logits` (None: the default circuit)."""
  if text is None:
    return None
  items = [i.strip() for i in (text.split(",") if isinstance(text, str) else text) if i.strip()]
  for item in items:
    m = _EDGE.match(item)
    if not m:
      raise ConfigError("--circuit", f"expected edges like L0H3->L1H5.k or L1H5->logits, got {item!r}")
    heads = [m[1]] + ([m[2].split(".")[0]] if m[2] != LOGITS else [])
    found = parse_heads(heads, spec, "--circuit")
    if len(heads) == 2 and found[0][0] >= found[-1][0]:
      raise ConfigError("--circuit", f"{item}: the sender must be in an earlier layer than the "
                        "receiver")
  if not items:
    raise ConfigError("--circuit", "no edges given")
  return items


def make_edges(spec, senders, receivers, inputs: tuple[str, ...]) -> core.Edges:
  every = core.Edges.every(spec, inputs)
  s = tuple(senders) if senders is not None else every.senders
  r_all = tuple(receivers) if receivers is not None else every.receivers
  r = tuple(x for x in r_all if x[0] > 0)
  return core.Edges(senders=s, receivers=r, inputs=inputs, logits=True)


def edge_columns(edges: core.Edges) -> list[tuple[str, str, str, tuple]]:
  """(sender, receiver, input, index) of every valid edge; index into ('heads', s, r, i) or ('logits', s)."""
  out = []
  for si, (sl, sh) in enumerate(edges.senders):
    for ri, (rl, rh) in enumerate(edges.receivers):
      if sl < rl:
        for ii, name in enumerate(edges.inputs):
          out.append((head_name(sl, sh), head_name(rl, rh), name, ("heads", si, ri, ii)))
    if edges.logits:
      out.append((head_name(sl, sh), LOGITS, "", ("logits", si)))
  return out


def edge_index(name: str, spec) -> int:
  """The flat index (`core.flat_edges`) of an edge `L0H3->L1H5.k` or `L1H5->logits`."""
  m = _EDGE.match(name)
  h, n = spec.num_heads, spec.num_layers * spec.num_heads
  flat = lambda head: int(head[0]) * h + int(head[1])  # noqa: E731
  s = flat(re.findall(r"\d+", m[1]))
  if m[2] == LOGITS:
    return n * n * 3 + s
  receiver, inp = m[2].split(".")
  return (s * n + flat(re.findall(r"\d+", receiver))) * 3 + core.INPUTS.index(inp)


def circuit_edges(circuits: Sequence[Sequence[str]], spec) -> tuple[np.ndarray, np.ndarray]:
  """Runs' circuits as `core.edge_scores` takes them.

  Returns:
    ([R, E] bool flat edge masks, [R, P] int flat indices of each circuit's
    edges in order, padded with -1 to the largest circuit, P >= 1).
  """
  n = spec.num_layers * spec.num_heads
  size = max([len(c) for c in circuits] + [1])
  masks = np.zeros((len(circuits), n * n * 3 + n), bool)
  index = np.full((len(circuits), size), -1, np.int32)
  for i, c in enumerate(circuits):
    idx = [edge_index(e, spec) for e in c]
    masks[i, idx] = True
    index[i, :len(idx)] = idx
  return masks, index


def circuit_nodes(edges: Sequence[str], spec) -> np.ndarray:
  """[L, H] bool: the heads named in a list of edges."""
  nodes = np.zeros((spec.num_layers, spec.num_heads), bool)
  for e in edges:
    for l, h in re.findall(r"L(\d+)H(\d+)", e):
      nodes[int(l), int(h)] = True
  return nodes


def _write_csv(path: str, columns: Sequence[str], rows: list[tuple]) -> None:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(columns)
  for r in rows:
    w.writerow([wd_lib.format_value(v) for v in r])
  wd_lib.atomic_write(path, buf.getvalue())


def _merge_phase_rows(wd: loader.Workdir, rows: list[dict[str, Any]]) -> str:
  """phase_changes.csv with earlier `patching/` rows replaced by `rows` (others
  kept), and summary.csv recomputed from all of it, so the edge timings are
  summarised per setting like every other curve."""
  path = os.path.join(wd.path, wd_lib.PHASE_CHANGES_CSV)
  columns = ["run", *wd.settings, *wd_lib.TIMING_COLUMNS]
  kept: list[dict[str, Any]] = []
  if os.path.isfile(path):
    old = wd_lib.read_csv(path)
    if old:
      columns = list(old[0].keys())
    kept = [r for r in old if not r["curve"].startswith(SOURCE + "/")]
  analysis_command.write_csv(path, columns, kept + rows)
  # Read back, so that the kept rows and the new ones have the same (text) types.
  analysis_command.write_summary(os.path.join(wd.path, wd_lib.SUMMARY_CSV),
                                 wd_lib.read_csv(path), wd.settings)
  return path


def patch(workdir: str, corruption: str | None = None, senders=None, receivers=None,
          inputs: str | Sequence[str] = "q,k,v", *, circuit=None, threshold: float = THRESHOLD,
          size: int = SIZE, direction: str = "noising", ablation: str = "mean",
          num_samples: int = 8, block: int = 4, chunk: int | None = None,
          batch_size: int | None = None, scores: str | bool = "edges", clamped: bool = True,
          quiet: bool = False, out=None) -> dict[str, Any]:
  """Path patching at every checkpoint of every run, edge timings and circuit scores.

  Args:
    workdir: a trained workdir.
    corruption: the task's corruption (`icldyn.tasks.corrupt`; None: its default).
    senders, receivers: heads `L1H3,L0H*` (None: every head; receivers in
      layer 0 are dropped, having no earlier sender).
    inputs: receiver inputs among q, k, v.
    circuit: edges `L0H3->L1H5.k,...` (None: the edges above `threshold`).
    threshold: the default circuit's share of the largest final effect.
    size: sequences per run in the clean batch.
    direction: 'noising' (Wang et al.) or 'denoising'.
    ablation: 'mean' or 'zero' knockouts for the circuit scores.
    num_samples: subsets per completeness and minimality score.
    block: checkpoints per call of the compiled program (run one after the
      other inside it: more costs little memory, one checkpoint's passes at
      a time).
    chunk: runs per vmap (None: 8 on a CPU, else all).
    batch_size: interventions per vmap inside a run: senders (each with
      1 + |receivers| x |inputs| patched passes) and scored sets (None: all
      senders and knocked-out head sets, 16 edge sets, `program.EDGE_SETS`).
      Memory grows with chunk x batch_size x size x seq_len^2; long sequences
      (the token task) need small ones (the README's token study: size 64,
      chunk 2, batch_size 8).
    scores: 'edges' (default: the circuit's edges, path-level ablation),
      'heads' (its heads, head knockouts), 'both' or 'none' (True, False:
      'edges', 'none'). Each level is one more pass over the stream.
    clamped: patch under the runs' training clamps (default) or without.
    quiet: no table on stdout.
    out: stream for the table (default stdout).

  Returns:
    {'patching', 'circuit', 'phase_changes', 'json': paths; 'circuits':
    {run: edges}; 'checkpoints'; 'seconds'}.

  Raises:
    ConfigError: bad workdir, corruption, heads, inputs or circuit (before anything is written).
  """
  t0 = time.time()
  wd = loader.open_workdir(workdir)
  task = config_lib.task_of(wd.config).name
  corruption = corruption or corrupt_lib.DEFAULT.get(task)
  corrupt_lib.get(task, corruption)
  if direction not in program_lib.DIRECTIONS:
    raise ConfigError("--direction", f"expected one of {', '.join(program_lib.DIRECTIONS)}")
  if ablation not in ("mean", "zero"):
    raise ConfigError("--ablation", "expected mean or zero")
  if not (0 < threshold <= 1):
    raise ConfigError("--threshold", f"must lie in (0, 1], got {threshold}")
  if isinstance(scores, bool):
    scores = "edges" if scores else "none"
  if scores not in SCORE_LEVELS:
    raise ConfigError("--scores", f"expected one of {', '.join(SCORE_LEVELS)}, got {scores!r}")
  for name, value, least in (("--size", size, 1), ("--block", block, 1), ("--chunk", chunk, 0),
                             ("--batch-size", batch_size, 0), ("--samples", num_samples, 1)):
    if value is not None and value < least:
      raise ConfigError(name, f"must be at least {least}, got {value}")
  inputs = parse_inputs(inputs)
  groups = wd.prepared().groups
  spec = groups[0].static.model
  senders = parse_heads(senders, spec, "--senders")
  receivers = parse_heads(receivers, spec, "--receivers")
  given = parse_circuit(circuit, spec)
  os.makedirs(os.path.join(wd.path, wd_lib.ANALYSIS_DIR), exist_ok=True)

  rows: list[tuple] = []
  curves: dict[int, dict[str, tuple[list[int], list[float]]]] = {}  # run -> edge -> logit_diff curve
  circuits: dict[int, list[str]] = {}
  circuit_rows: list[tuple] = []
  pending: list[tuple[Any, Any, list[int]]] = []  # (group, its data, its steps) to score
  n_ckpt = 0
  for pg in groups:
    steps = wd.stream_steps(pg.group.index)
    if not steps:
      log.info("group %d has no checkpoint stream; nothing to patch", pg.group.index)
      continue
    static, runs = pg.static, pg.group.runs
    edges = make_edges(static.model, senders, receivers, inputs)
    cols = edge_columns(edges)
    data = program_lib.put(program_lib.make_data(static, pg.table, pg.props, corruption, size))
    fn = program_lib.path_program(static, edges, direction, chunk, clamped, batch_size)
    tg = time.time()
    done = 0
    for bsteps, params in program_lib.blocks(loader.stream(wd.path, pg.group.index, steps), block):
      res = program_lib.as_numpy(fn(params, data))
      for k, step in enumerate(bsteps):
        for i, run in enumerate(runs):
          for metric in core.METRICS:
            rows.append((step, run, "clean", "", "", metric, res["base"][metric][k, i]))
            rows.append((step, run, "corrupted", "", "", metric, res["source"][metric][k, i]))
            for s, r, inp, idx in cols:
              arr = res[idx[0]][metric][k, i]
              v = arr[idx[1:]]
              rows.append((step, run, s, r, inp, metric, v))
              if metric == "logit_diff":
                c = curves.setdefault(run, {}).setdefault(edge_name(s, r, inp), ([], []))
                c[0].append(step)
                c[1].append(float(v))
      done += len(bsteps)
      log.info("group %d: path patching %d/%d checkpoints x %d runs x %d edges (%.1fs)",
               pg.group.index, done, len(steps), len(runs), len(cols), time.time() - tg)
    n_ckpt += len(steps)

    for run in runs:
      finals = {e: c[1][-1] for e, c in curves[run].items()}
      if given is not None:
        circuits[run] = list(given)
      else:
        big = max((abs(v) for v in finals.values() if math.isfinite(v)), default=0.0)
        circuits[run] = [e for e, v in finals.items()
                         if big > 0 and math.isfinite(v) and abs(v) >= threshold * big]
    pending.append((pg, data, steps))

  # The path-patching results are written before the circuit scores are
  # computed (the longer pass), so that they survive an interrupted scoring.
  paths = {"patching": os.path.join(wd.path, wd_lib.PATCHING_CSV),
           "circuit": os.path.join(wd.path, wd_lib.CIRCUIT_CSV),
           "json": os.path.join(wd.path, PATCHING_JSON)}
  _write_csv(paths["patching"], wd_lib.PATCHING_COLUMNS, rows)
  timed = edge_curves(curves, circuits)
  phase = analysis_command.phase_rows(wd, timed)
  paths["phase_changes"] = _merge_phase_rows(wd, phase)
  meta = {"corruption": corruption, "direction": direction, "size": size, "ablation": ablation,
          "clamped": clamped, "scores": scores,
          "threshold": None if given is not None else threshold, "metric": "logit_diff",
          "level": LEVEL, "circuits": {str(r): e for r, e in circuits.items()}}
  wd_lib.atomic_write(paths["json"], json.dumps(meta, indent=1) + "\n")
  if not quiet:
    print(edge_table(phase, circuits, curves), file=out or sys.stdout, flush=True)

  for pg, data, steps in pending:
    static, runs = pg.static, pg.group.runs
    for level in ("edges", "heads"):
      if scores not in (level, "both"):
        continue
      if level == "edges":
        masks, index = circuit_edges([circuits[r] for r in runs], static.model)
        cfn = program_lib.edge_circuit_program(static, ablation, num_samples, chunk=chunk,
                                               clamped=clamped, batch_size=batch_size)
        args = (masks, index)
      else:
        masks = np.stack([circuit_nodes(circuits[r], static.model) for r in runs])
        cfn = program_lib.circuit_program(static, ablation, num_samples, chunk=chunk,
                                          clamped=clamped, batch_size=batch_size)
        args = (masks,)
      tg, done = time.time(), 0
      for bsteps, params in program_lib.blocks(loader.stream(wd.path, pg.group.index, steps),
                                                block):
        res = program_lib.as_numpy(cfn(params, data, *args))
        for k, step in enumerate(bsteps):
          for i, run in enumerate(runs):
            for name in ("F_model", "F_circuit", "F_empty", "faithfulness",
                         "faithfulness_recovered", "completeness"):
              circuit_rows.append((step, run, level, name, "", res[name][k, i]))
            mini = res["minimality"][k, i]
            if level == "edges":
              for p, e in enumerate(circuits[run]):
                circuit_rows.append((step, run, level, "minimality", e, mini[p]))
            else:
              for l, h in zip(*np.nonzero(masks[i])):
                circuit_rows.append((step, run, level, "minimality", head_name(int(l), int(h)),
                                     mini[l, h]))
        done += len(bsteps)
        log.info("group %d: %s circuit scores %d/%d checkpoints (%.1fs)", pg.group.index, level,
                 done, len(steps), time.time() - tg)
  if scores != "none":
    _write_csv(paths["circuit"], wd_lib.CIRCUIT_COLUMNS, circuit_rows)
  return {**paths, "circuits": circuits, "checkpoints": n_ckpt, "seconds": time.time() - t0}


def edge_curves(curves: dict[int, dict[str, tuple[list[int], list[float]]]],
                circuits: dict[int, list[str]]) -> dict[str, tuple[Any, dict[int, loader.Curve]]]:
  """Each circuit edge's curve, normalised by its final value, as `phase_rows` takes them."""
  out: dict[str, tuple[Any, dict[int, loader.Curve]]] = {}
  for run, edges in circuits.items():
    for e in edges:
      if e not in curves.get(run, {}):
        continue
      steps, values = curves[run][e]
      y = np.asarray(values, np.float64)
      final = y[-1]
      if not (math.isfinite(final) and final != 0):
        continue
      name = f"{SOURCE}/{e}"
      spec = analysis_command.CurveSpec(SOURCE, e, "up", LEVEL)
      out.setdefault(name, (spec, {}))[1][run] = loader.Curve(np.asarray(steps, np.int64), y / final)
  return out


def edge_table(phase: list[dict[str, Any]], circuits: dict[int, list[str]], curves) -> str:
  """Circuit edges per run in order of formation (threshold estimator)."""
  lines = [f"Circuit edges by run, in order of formation ({wd_lib.HEADLINE_ESTIMATOR} midpoint, "
           f"training sequences; effect on the logit difference at the last checkpoint)"]
  by_run: dict[int, list[tuple[float, str]]] = {}
  for r in phase:
    if r["estimator"] == wd_lib.HEADLINE_ESTIMATOR:
      by_run.setdefault(int(r["run"]), []).append((r["midpoint"], r["curve"].split("/", 1)[1]))
  for run in sorted(circuits):
    items = sorted(by_run.get(run, []), key=lambda x: (not math.isfinite(x[0]), x[0]))
    cells = [f"{e} {'-' if not math.isfinite(t) else f'{t:.3g}'} ({curves[run][e][1][-1]:+.2f})"
             for t, e in items]
    lines.append(f"run {run}: " + ("; ".join(cells) if cells else "(no edges)"))
  return "\n".join(lines)


def read_patching(workdir: str):
  """analysis/patching.csv as a DataFrame (None if absent)."""
  return results.read_table(os.path.join(workdir, wd_lib.PATCHING_CSV))
