"""Sub-circuit clamps (Singh et al. 2024, Fig. 5b): which sub-circuit limits the phase change.

Command:
    icldyn train --config subcircuits[:cpu|:smoke] --workdir runs/subcircuits

What it runs: one active layer-2 head (`clamp.keep_head=0`) and the six
conditions `clamp.condition=none,prev_token,layer1,match,copy,layer1_copy`
(see docs/clamps.md for each), in one grid. Paper variant: 6 conditions x 3
seeds, 1e6 sequences; `cpu`: 6 x 2 at lr 5e-5, 2e5 sequences (measured 406 s on
2 CPU cores); `smoke`: seconds. The paper variant trained in about 18 min on 2
CPU cores (2026-11-22); no GPU was lent to time it.

What the paper found: the induction-head phase change comes from three
interacting sub-circuits (previous-token in layer 1; match, i.e. the layer-2
QK path; copy, i.e. the layer-2 OV path); clamping sub-circuits to their ideal
form makes the transition earlier, and the more is clamped the smoother and
earlier it gets, consistent with the toy model of multiplicative interaction.
Measured here (cpu variant, Gaussian data, 2 seeds, threshold 0.4 ln 2 on
fsl_train loss): layer1_copy ~5e3 < match ~9.5e3 < layer1 ~1.3e4 < copy ~2.4e4
< prev_token ~8.7e4 < none ~1.5e5 sequences.
"""

from icldyn.studies.common import study_config

CONDITIONS = "none,prev_token,layer1,match,copy,layer1_copy"


# Variant -> one line (`icldyn list`).
VARIANTS = {
    '': '6 sub-circuit conditions x 3 seeds, 1e6 sequences (Fig. 5b)',
    'cpu': '6 x 2 at lr 5e-5, 2e5 sequences',
    'smoke': 'seconds',
}


def get_config(arg: str = ""):
  if arg == "smoke":
    return study_config(arg, ("clamp.keep_head=0", "clamp.condition=none,layer1_copy"), 1)
  return study_config(arg, ("clamp.keep_head=0", f"clamp.condition={CONDITIONS}"), 3)
