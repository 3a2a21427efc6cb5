"""The default demo (`make demo`): a scaled-down main study that shows the phase change on a CPU.

Command:
    icldyn demo --workdir runs/demo        # = make demo
    icldyn train --config demo --workdir runs/demo_train

What it runs: the paper's model and task (ih_paper: 2 layers, 8 heads,
d_model 64, RoPE, LayerNorm, 50 Gaussian classes of 512 dims, 2 pairs + query, 5
labels) for 4 init seeds in one grid, with a 5x larger learning rate (5e-5) and
2e5 sequences, so the induction-head phase change happens within minutes: the
fsl_train loss sits near ln 2 (0.69) around 4-6e4 sequences and falls below
0.4 ln 2 at about 1.0-1.4e5. About 1-2 minutes of training on 2 CPU cores.
"""

from icldyn.studies.common import study_config
from icldyn.errors import did_you_mean


# Variant -> one line (`icldyn list`).
VARIANTS = {
    '': "4 seeds of the paper's model at lr 5e-5, 2e5 sequences: the phase change in minutes on a CPU",
    'smoke': 'seconds',
}


def get_config(arg: str = ""):
  if arg == "smoke":
    return study_config("smoke", (), 1)
  if arg:
    raise ValueError(f"unknown variant {arg!r}{did_you_mean(arg, ('smoke',))} "
                     "(use '' or 'smoke')")
  c = study_config("cpu", (), 4, cpu_seeds=4)
  with c.unlocked():
    c.checkpoint.log_num = 10  # dense early checkpoints as well as every 10k
  return c
