"""Data dependence of the sub-circuits (Singh et al. 2024, Fig. 6).

Command:
    icldyn train --config data_dependence[:cpu|:smoke] --workdir runs/data_dependence

What it runs: number of training classes 50/100/200 and number of labels
5/10/15, each unclamped (`none`), with only the match sub-circuit learning
(`layer1_copy`: layer 1 and copy clamped) and with only the copy sub-circuit
learning (`match`: match clamped), one active layer-2 head. Runs with different
class or label counts share one program (padded). Paper variant: 3 x 3 x 3 x 2
seeds = 54 runs, 1e6 sequences (measured about 61 min of training on 2 CPU
cores, 2026-11-22; no GPU was lent, so no GPU time); `cpu`: classes x labels x
conditions with one seed at lr 5e-5, 2e5 sequences (measured 1079 s on 2 CPU
cores); `smoke`: seconds.

What the paper found: the phase change's timing shifts with data properties
because the match and copy sub-circuits depend on different properties; the
unclamped transition needs both. Measured here (paper variant, Gaussian
classes): copy-only learning slows with the number of labels (3.1x from 5 to
15), match-only learning with the number of classes (3.0x from 50 to 200), and
the unclamped transition is pushed past 1e6 sequences by either (README,
Results).
"""

from icldyn.studies.common import study_config


# Variant -> one line (`icldyn list`).
VARIANTS = {
    '': 'classes x labels x conditions x 2 seeds, 1e6 sequences (Fig. 6)',
    'cpu': 'a smaller grid at lr 5e-5',
    'smoke': 'seconds',
}


def get_config(arg: str = ""):
  if arg == "smoke":
    c = study_config(arg, ("data.num_train_classes=20,40", "data.num_labels=5,10",
                           "clamp.keep_head=0", "clamp.condition=none,match"), 1)
  else:
    c = study_config(arg, ("data.num_train_classes=50,100,200", "data.num_labels=5,10,15",
                           "clamp.keep_head=0", "clamp.condition=none,layer1_copy,match"),
                     2 if arg == "" else 1)
  return c
