"""Toy model of phase changes: a rank-1 tensor product a⊗b⊗c, with clamps.

Run:

  icldyn toy --config toy --workdir DIR
  icldyn toy --config toy:smoke --workdir DIR   # seconds

What it runs: plain gradient descent on ½‖a⊗b⊗c − a*⊗b*⊗c*‖²_F from a small
random start (`icldyn.toy`), once with all three factors learned and once
with each factor clamped to its target, for several initialisation seeds.
It writes DIR/toy_metrics.csv, DIR/toy_transitions.csv and DIR/toy.png.

What the paper found: Singh et al. 2024 (arXiv 2404.07129) clamp parts of
the induction circuit during training and trace the abrupt induction-head
phase change to three interacting sub-circuits whose effects multiply, so
none of them gets much gradient until the others are partly formed; their
Fig. 5a discussion uses a product of components to show that this alone
yields a plateau and a sudden drop, and that fixing one component moves the
drop earlier or smooths it away. Here (defaults, seeds 0..7): unclamped, the
loss stays near its start and halves only at step 250-890, falling from 90 %
to 10 % of it within ~22 steps; clamping any one factor turns the cubic
interaction into a quadratic one and the loss halves at step 28-91.

The CLI maps this config onto the library call

  icldyn.toy.run_toy_study(DIR, icldyn.toy.ToyConfig.from_mapping(cfg.toy),
                           cfg.init_seeds, clamps=cfg.clamps,
                           level=cfg.level)
"""

import ml_collections

# Variant -> one line (`icldyn list`).
VARIANTS = {'': 'the toy model over init seeds, each factor clamped in turn', 'smoke': 'seconds'}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The toy study's config.

  Args:
    arg: '' (or None) for the full study, 'smoke' for a seconds-long check.

  Returns:
    A ConfigDict with `toy` (the `icldyn.toy.ToyConfig` fields shared by every
    condition), `init_seeds` (initialisation seeds, the same in every
    condition), `clamps` (one extra condition per clamped factor) and `level`
    (the transition is where the loss first falls below level × its initial
    value).
  """
  variant = arg or ''
  if variant not in VARIANTS:
    raise ValueError(f'unknown toy variant {variant!r}; known: {list(VARIANTS)}')

  c = ml_collections.ConfigDict()
  c.toy = ml_collections.ConfigDict()
  c.toy.dim = 16
  c.toy.init_scale = 0.1  # expected norm of each factor at step 0
  c.toy.learning_rate = 0.1
  c.toy.num_steps = 4000  # > the 98th percentile of unclamped transitions
  c.toy.target_seed = 0
  c.toy.log_every = 5
  c.init_seeds = tuple(range(8))
  c.clamps = ('a', 'b', 'c')
  c.level = 0.5

  if variant == 'smoke':
    # Seeds 0 and 1 cross at ~650 and ~250 steps unclamped, so 1000 steps
    # still show a plateau and a drop.
    c.toy.num_steps = 1000
    c.toy.log_every = 10
    c.init_seeds = (0, 1)
    c.clamps = ('c',)
  return c
