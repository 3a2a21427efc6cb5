"""Single-head training (Singh et al. 2024, Fig. 4b): all but one layer-2 head ablated throughout.

Command:
    icldyn train --config single_head[:cpu|:smoke] --workdir runs/single_head

What it runs: the main study's model and task; `--grid clamp.keep_head=0..7`
gives 8 runs per seed in one compiled program (the kept head is per-run data).
Paper variant: 8 heads x 3 seeds = 24 runs, 1e6 sequences each; `cpu`: 8 x 2 at
lr 5e-5 and 2e5 sequences (measured 360 s on 2 CPU cores); `smoke`: 2 runs, seconds.
The paper variant took 19 min on 2 CPU cores including analysis and plots
(2026-11-22, partly sharing the cores with a test run); no GPU was lent to time it.

What the paper found: every single head, trained alone in layer 2, can become
an induction head, so the dominance of one head in the full model is not about
that head's initial weights alone; alone, the transition comes at a similar time.
"""

from icldyn.studies.common import study_config


# Variant -> one line (`icldyn list`).
VARIANTS = {
    '': '8 kept heads x 3 seeds, 1e6 sequences (Fig. 4b)',
    'cpu': '8 heads x 2 seeds at lr 5e-5, 2e5 sequences',
    'smoke': '2 runs, seconds',
}


def get_config(arg: str = ""):
  if arg == "smoke":
    return study_config(arg, ("clamp.keep_head=0,1",), 1)
  return study_config(arg, ("clamp.keep_head=0,1,2,3,4,5,6,7",), 3)
