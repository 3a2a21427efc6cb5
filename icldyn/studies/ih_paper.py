"""The paper's main run (Singh et al. 2024, "What needs to go right for an induction head?").

Command:
    icldyn train --config ih_paper --workdir runs/ih_paper
    icldyn train --config ih_paper:smoke --workdir /tmp/ih_smoke   # seconds

What it runs: 2 layers, 8 heads, d_model 64, RoPE, LayerNorm, attention only; Adam,
lr 1e-5, batch 32; 50 training classes with 1 exemplar each (4 held out), 100
held-out classes; 2 exemplar-label pairs + query (query class once, one
distractor); each sequence relabelled to 2 of 5 labels with the 10 label pairs
split 8 / 2; 1e6 sequences; four evaluators of 1000 sequences every 5000.
Variants: '' (one seed), 'seeds' (5 init seeds in one grid), 'cpu' (4 seeds, lr 5e-5,
2e5 sequences: the phase change within a CPU budget; measured 160 s on 2 CPU
cores), 'smoke'. The paper variant (1 seed, 1e6 sequences, 16 evaluation clamps)
took about 5 min on 2 CPU cores including analysis and plots (measured
2026-11-22, sharing the cores with a test run); no GPU was lent to time it there.
Evaluated also under the named clamps keep_head_h and ablate_head_1_h (Fig. 4a).
On Gaussian class data by default (Omniglot features cannot be downloaded here);
use --config.data.source=file --config.data.path=FEATURES.h5 for real features.

What the paper found: the fsl_train loss plateaus near ln 2 and then drops
abruptly as layer-2 induction heads form (~2-3e5 sequences on Omniglot);
several heads reach high induction strength, but one dominates (Fig. 3, 4a).
"""

from icldyn.studies.common import study_config
from icldyn.errors import did_you_mean

# Fig. 4a: accuracy with only head h of layer 2 kept, and with each single head ablated.
EVAL_CLAMPS = ",".join([f"keep_head_{h}" for h in range(8)] +
                       [f"ablate_head_1_{h}" for h in range(8)])


# Variant -> one line (`icldyn list`).
VARIANTS = {
    '': "the paper's main run: 1 seed, 1e6 sequences, 16 evaluation clamps",
    'seeds': '5 init seeds in one grid',
    'cpu': '4 seeds at lr 5e-5, 2e5 sequences (minutes on a CPU)',
    'smoke': 'seconds',
}


def get_config(arg: str = ""):
  if arg == "smoke":
    return study_config("smoke", (), 1, "keep_head_0,ablate_head_1_0")
  if arg == "seeds":
    return study_config("", (), 5, EVAL_CLAMPS)
  if arg not in ("", "cpu"):
    raise ValueError(f"unknown variant {arg!r}{did_you_mean(arg, ('seeds', 'cpu', 'smoke'))} "
                     "(use '', 'seeds', 'cpu' or 'smoke')")
  return study_config(arg, (), 1 if arg == "" else 4, EVAL_CLAMPS, cpu_seeds=4)
