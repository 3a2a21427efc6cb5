"""Attention patterns of one run at chosen checkpoints (before, during, after the transition).

Writes `analysis/attention_patterns.npz` (keys `patterns [n_ckpt, L, H, T, T]`,
`steps [n_ckpt]`, `run`), which `icldyn.plots.make_all` draws. Patterns are
averaged over the run's first 256 evaluation sequences of the task's
analysis evaluator (`fsl_train` for the few-shot task).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from icldyn import config as config_lib
from icldyn import model as model_lib
from icldyn import results
from icldyn.analysis import loader, measures
from icldyn.store import files as wd_lib

OUTPUT = wd_lib.ATTENTION_NPZ


def default_steps(workdir: str, run: int, steps: list[int]) -> list[int]:
  """Three stream steps: first, nearest the run's threshold midpoint, last.

  The midpoint comes from analysis/phase_changes.csv (the task's headline
  curve, `fsl_train/loss` for the few-shot task; estimator threshold);
  without one, the middle checkpoint is used.
  """
  mid = None
  path = os.path.join(workdir, wd_lib.PHASE_CHANGES_CSV)
  curve = config_lib.task_of(loader.open_workdir(workdir).config).headline
  table = results.read_table(path)
  if table is not None and "crossed" in table:
    hit = results.select(table, {"run": run, "curve": curve, "estimator": "threshold"})
    hit = hit[results.as_bool(hit["crossed"])]
    if len(hit):
      mid = float(hit["midpoint"].iloc[-1])
  middle = steps[len(steps) // 2] if mid is None else min(steps, key=lambda s: abs(s - mid))
  return sorted({steps[0], middle, steps[-1]})


def write_attention_patterns(workdir: str, run: int = 0, steps: list[int] | None = None,
                             size: int = 256) -> str | None:
  """Computes and saves the patterns; returns the file path, or None without checkpoints."""
  wd = loader.open_workdir(workdir)
  row = next(r for r in wd.runs if int(r["run"]) == run)
  group, index = int(row["group"]), int(row["group_index"])
  available = wd.stream_steps(group)
  if not available:
    return None
  steps = steps or default_steps(workdir, run, available)
  pg = wd.prepared().groups[group]
  props = jax.tree.map(lambda x: np.asarray(x)[index:index + 1], pg.props)
  batch = jax.tree.map(lambda x: x[0], measures.eval_batch(pg.static, pg.table, props, size))
  spec = pg.static.model
  num_outputs = jax.tree.map(lambda x: x[0], props.data).num_outputs

  @jax.jit
  def patterns(params):
    _, acts = model_lib.apply(spec, params, batch, num_outputs)
    return jnp.stack([acts[f"layer_{l}"]["attn"]["pattern"].mean(0) for l in range(spec.num_layers)])

  out = np.stack([np.asarray(patterns(loader.restore_run(wd, s, run))) for s in steps])
  path = os.path.join(workdir, OUTPUT)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path, patterns=out, steps=np.asarray(steps), run=np.int64(run))
  return path
