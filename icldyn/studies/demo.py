"""The default demo (`make demo`): a scaled-down main study that shows the phase change on a CPU.

Command:
    icldyn demo --workdir runs/demo        # = make demo
    icldyn train --config demo --workdir runs/demo_train

What it runs: the paper's model and task (ih_paper: 2 layers, 8 heads,
d_model 64, RoPE, LayerNorm, Gaussian classes of 512 dims, 2 pairs + query, 5
labels) for 4 init seeds in one grid, with two changes that make the
phase change plain within minutes on a CPU: 1000 training classes instead
of 50 (more classes slow the match sub-circuit, Singh et al. 2024,
so the loss waits longer near ln 2) and a 10x larger learning rate (1e-4),
for 3e5 sequences. Measured (2026-11-29, 2 CPU cores): the fsl_train loss
falls to ln 2 within 3e4 sequences, waits at 0.67-0.77 until 1.0-1.6e5,
then drops, crossing 0.4 ln 2 at 1.76e5 +- 2.4e4 (4/4 seeds); with 1000
classes the match also transfers to held-out classes (fsl_test_class
accuracy 0.91-0.98 at 3e5, against 0.52-0.59 with 50 classes).
Settings chosen by measuring
lr {5e-5, 1e-4} x labels {3, 4, 5} x classes {50, 200, 1000, 4000}
(README, "The demo's settings").
"""

from icldyn.studies.common import study_config
from icldyn.errors import did_you_mean


# Variant -> one line (`icldyn list`).
VARIANTS = {
    '': "4 seeds of the paper's model with 1000 classes at lr 1e-4, 3e5 sequences: a plateau near ln 2, then the drop",
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
    c.data.num_train_classes = 1000  # the plateau near ln 2 lasts ~1.4e5 sequences (50: ~2e4)
    c.train.learning_rate = 1e-4
    c.train.num_sequences = 300_000
  return c
