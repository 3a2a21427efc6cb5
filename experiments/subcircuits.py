"""Sub-circuit clamps (Singh et al. 2024, Fig. 5b): which sub-circuit limits the phase change.

Command:
    icldyn train --config experiments/subcircuits.py[:cpu|:smoke] --workdir runs/subcircuits

What it runs: one active layer-2 head (`clamp.keep_head=0`) and the six
conditions `clamp.condition=none,prev_token,layer1,match,copy,layer1_copy`
(see docs/clamps.md for each), in one grid. Paper variant: 6 conditions x 3
seeds, 1e6 sequences; `cpu`: 6 x 2 at lr 5e-5, 2e5 sequences; `smoke`: seconds.

What the paper found: clamping the previous-token sub-circuit or the whole
layer 1 barely moves the transition; clamping the copy sub-circuit (so only
match must be learned) or the match sub-circuit (so only copy must be learned)
shifts it, and with layer 1 + copy clamped the transition is earliest: the
phase change is set by the interaction of the sub-circuits.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import study_config  # noqa: E402

CONDITIONS = "none,prev_token,layer1,match,copy,layer1_copy"


def get_config(arg: str = ""):
  if arg == "smoke":
    return study_config(arg, ("clamp.keep_head=0", "clamp.condition=none,layer1_copy"), 1)
  return study_config(arg, ("clamp.keep_head=0", f"clamp.condition={CONDITIONS}"), 3)
