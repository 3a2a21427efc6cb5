"""The default demo (`make demo`): a scaled-down main study that shows the phase change on a CPU.

Command:
    icldyn demo --workdir runs/demo        # = make demo
    icldyn train --config experiments/demo.py --workdir runs/demo_train

What it runs: the paper's model and task (experiments/ih_paper.py: 2 layers, 8 heads,
d_model 64, RoPE, LayerNorm, 50 Gaussian classes of 512 dims, 2 pairs + query, 5
labels) for 4 init seeds in one grid, with a 5x larger learning rate (5e-5) and
2e5 sequences, so the induction-head phase change happens within minutes: the
fsl_train loss sits near ln 2 (0.69) around 4-6e4 sequences and falls below
0.4 ln 2 at about 1.0-1.4e5. About 1-2 minutes of training on 2 CPU cores.
"""

from icldyn.config import base_config


def get_config(arg: str = ""):
  c = base_config()
  with c.unlocked():
    c.train.learning_rate = 5e-5
    c.train.num_sequences = 200_000
    c.train.eval_every = 5000
    c.eval.size = 500
    c.checkpoint.every = 10_000
    c.checkpoint.log_num = 10
    c.checkpoint.resume_every = 50_000
    c.grid = ("seeds.init=0,1,2,3",)
    if arg == "smoke":
      c.train.num_sequences = 3200
      c.train.eval_every = 1600
      c.eval.size = 64
      c.grid = ("seeds.init=0,1",)
    elif arg:
      raise ValueError(f"unknown variant {arg!r} (use '' or 'smoke')")
  return c
