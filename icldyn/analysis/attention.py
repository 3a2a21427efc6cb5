"""Attention patterns of chosen runs at chosen checkpoints (before, during, after the transition).

Writes `analysis/attention_patterns.npz`, which `icldyn.plots.make_all` draws:

| key | shape | what |
|---|---|---|
| `runs`, `run_labels` | `[R]` | the runs, and the settings that name each |
| `steps` | `[S]` | checkpoints (training sequences) |
| `mean` | `[R, S, L, H, T, T]` | patterns averaged over the run's first `size` analysis sequences |
| `examples` | `[R, S, E, L, H, T, T]` | the patterns of the first `E` of those sequences |
| `example_labels` | `[R, E, T]` | what each position of those sequences holds (`front.token_labels`) |
| `position_labels` | `[T]` | what a position holds in every sequence, else its index |
| `prev_head`, `induction_head` | `[R]` | the first-layer head with the highest previous-token score and the last-layer head with the highest induction score, at the last step |

The sequences are the first of the run's evaluation set of the task's
analysis evaluator (`fsl_train` for the few-shot task).
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from icldyn import config as config_lib
from icldyn import results
from icldyn import step as train_lib
from icldyn.analysis import loader, measures
from icldyn.errors import ConfigError
from icldyn.store import checkpoints as ckpt_lib
from icldyn.store import files as wd_lib

OUTPUT = wd_lib.ATTENTION_NPZ


def default_steps(workdir: str, run: int, steps: list[int], curve: str) -> list[int]:
  """Three stream steps: first, nearest the run's threshold midpoint, last.

  The midpoint comes from analysis/phase_changes.csv (the task's headline
  curve, `fsl_train/loss` for the few-shot task; estimator threshold);
  without one, the middle checkpoint is used.
  """
  mid = None
  path = os.path.join(workdir, wd_lib.PHASE_CHANGES_CSV)
  table = results.read_table(path)
  if table is not None and "crossed" in table:
    hit = results.select(table, {"run": run, "curve": curve, "estimator": "threshold"})
    hit = hit[results.as_bool(hit["crossed"])]
    if len(hit):
      mid = float(hit["midpoint"].iloc[-1])
  middle = steps[len(steps) // 2] if mid is None else min(steps, key=lambda s: abs(s - mid))
  return sorted({steps[0], middle, steps[-1]})


def position_labels(labels: np.ndarray) -> np.ndarray:
  """[T] str: what a position holds in every sequence of `labels [E, T]` (a
  label's value after '=' dropped), else the position's index."""
  base = np.vectorize(lambda x: x.split("=")[0])(labels)
  same = (base == base[:1]).all(axis=0)
  return np.where(same, base[0], np.arange(labels.shape[1]).astype(str))


def write_attention_patterns(workdir: str, runs: Sequence[int] | None = None,
                             steps: Sequence[int] | None = None, size: int = 256,
                             examples: int = 2) -> str | None:
  """Computes and saves the patterns; returns the file path, or None without checkpoints.

  Args:
    workdir: a trained workdir.
    runs: the runs (default: run 0).
    steps: checkpoint steps (default: first, nearest the first run's phase
      change, last); a run whose group lacks a step gets its nearest one.
    size: sequences averaged.
    examples: individual sequences kept.
  """
  wd = loader.open_workdir(workdir)
  runs = list(runs) if runs is not None else [int(wd.runs[0]["run"])]
  rows = {int(r["run"]): r for r in wd.runs}
  bad = [r for r in runs if r not in rows]
  if bad:
    raise ConfigError("--runs", f"no run {bad[0]} in {workdir}: its runs are 0 to {len(rows) - 1}")
  first_steps = wd.stream_steps(int(rows[runs[0]]["group"]))
  if not first_steps:
    return None
  steps = sorted(steps) if steps else default_steps(workdir, runs[0], first_steps,
                                                      config_lib.task_of(wd.config).headline)
  mean, example, labels, prev, induction = [], [], [], [], []
  for run in runs:
    group, index = int(rows[run]["group"]), int(rows[run]["group_index"])
    available = wd.stream_steps(group)
    if not available:
      raise ConfigError("--runs", f"run {run} has no checkpoints")
    pg = wd.prepared().groups[group]
    props = jax.tree.map(lambda x: np.asarray(x)[index:index + 1], pg.props)
    batch = jax.tree.map(lambda x: x[0], measures.eval_batch(pg.static, pg.table, props, size))
    spec = pg.static.model
    one_props = jax.tree.map(lambda x: x[0], props)

    # The batch is an argument, not a closure: as a constant XLA would try to fold it.
    # The run's training clamps apply, as in training and in its measures.
    @functools.partial(jax.jit, static_argnums=0)
    def patterns(static, params, batch, props):
      _, acts = train_lib.forward(static, params, batch, props, static.plan)
      spec = static.model
      p = jnp.stack([acts[f"layer_{l}"]["attn"]["pattern"] for l in range(spec.num_layers)],
                    axis=1)  # [B, L, H, T, T]
      first, last = p[:, 0], p[:, -1]
      scores = (measures.prev_token(first, spec.front.layout),
                measures.induction_strength(last, spec.front.targets(batch)))
      return p.mean(0), p[:examples], scores

    per_step = []
    for s in steps:
      nearest = min(available, key=lambda a: abs(a - s))
      params = ckpt_lib.restore_run(workdir, nearest, group, index)
      per_step.append(jax.device_get(patterns(pg.static, params, batch, one_props)))
    mean.append(np.stack([m for m, _, _ in per_step]))
    example.append(np.stack([e for _, e, _ in per_step]))
    prev.append(int(np.argmax(per_step[-1][2][0])))
    induction.append(int(np.argmax(per_step[-1][2][1])))
    labels.append(spec.front.token_labels(jax.tree.map(lambda x: np.asarray(x)[:examples],
                                                       batch)))
  varying = [k for k in wd.settings if len({r[k] for r in wd.runs}) > 1]
  if any(k.startswith("clamp.") for k in varying):
    varying = [k for k in varying if k != "clamps"]  # the clamps column restates clamp.*
  run_labels = [", ".join(f"{k.rsplit('.', 1)[-1]}={rows[r][k]}" for k in varying) or f"run {r}"
                for r in runs]
  path = os.path.join(workdir, OUTPUT)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  example_labels = np.stack(labels)
  np.savez(path, runs=np.asarray(runs), run_labels=np.asarray(run_labels), steps=np.asarray(steps),
           mean=np.stack(mean), examples=np.stack(example), example_labels=example_labels,
           position_labels=position_labels(example_labels[0]), prev_head=np.asarray(prev),
           induction_head=np.asarray(induction))
  return path
