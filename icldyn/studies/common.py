"""Shared variants of the paper studies (not a study itself).

`paper`: the paper's settings (Adam, lr 1e-5, 1e6 sequences). `cpu`: the same
model and task with lr 5e-5 and 2e5 sequences, where the phase change happens
within a CPU budget (see icldyn/studies/demo.py). `smoke`: seconds.
"""

from icldyn.config import base_config
from icldyn.errors import did_you_mean


def study_config(variant: str, grid: tuple, seeds: int, eval_clamps: str = "",
                 cpu_seeds: int = 2):
  """The base config of a study for a variant ('', 'cpu', 'smoke').

  Args:
    variant: '' (paper settings), 'cpu' or 'smoke'.
    grid: the study's grid axes (seeds are added).
    seeds: init seeds of the paper variant.
    eval_clamps: named clamps to evaluate under.
    cpu_seeds: at most this many seeds in the cpu variant.
  """
  c = base_config()
  with c.unlocked():
    c.eval.clamps = eval_clamps
    if variant == "":
      c.grid = grid + (f"seeds.init={','.join(map(str, range(seeds)))}",)
    elif variant == "cpu":
      c.train.learning_rate = 5e-5
      c.train.num_sequences = 200_000
      c.eval.size = 500
      c.checkpoint.every = 10_000
      c.checkpoint.resume_every = 50_000
      c.grid = grid + (f"seeds.init={','.join(map(str, range(min(seeds, cpu_seeds))))}",)
    elif variant == "smoke":
      c.train.num_sequences = 1600
      c.train.eval_every = 800
      c.eval.size = 32
      c.eval.batch = 32
      c.checkpoint.every = 800
      c.checkpoint.resume_every = 800
      c.grid = grid
    else:
      raise ValueError(f"unknown variant {variant!r}{did_you_mean(variant, ('cpu', 'smoke'))} "
                       "(use '', 'cpu' or 'smoke')")
  return c
