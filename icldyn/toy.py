"""A toy model of phase changes: gradient descent on a rank-1 product a⊗b⊗c.

Singh et al. 2024 ("What needs to go right for an induction head?",
arXiv 2404.07129, discussion of Fig. 5a) explain the abrupt loss drop of induction
head formation by three sub-circuits whose contributions *multiply*: the loss
only moves once all of them are partly formed, and each one's gradient is
scaled by how far the others have come. This module is the smallest model
with that property. Three vectors a, b, c ∈ R^D are fitted by plain gradient
descent to a rank-1 target tensor T* = a*⊗b*⊗c* from a small random start:

  L(a, b, c) = ½ ‖a⊗b⊗c − T*‖²_F.

Writing x = a·a*, y = b·b*, z = c·c* (unit targets), near the start the flow is
ẋ ≈ yz, ẏ ≈ xz, ż ≈ xy: growth is quadratic in the (tiny) overlaps, so from a
start of size ε the overlaps stay ~ε for ~1/(ηε) steps and then blow up in
finite time, which is a plateau followed by an abrupt drop. Clamping one factor
to its target (say c = c*) removes one multiplicative dependency: the flow
becomes ẋ ≈ y, ẏ ≈ x, exponential growth that leaves the plateau after only
~log(1/ε)/η steps. This mirrors the paper's clamping of sub-circuits during
training (and the deep-linear-network picture of Saxe et al. 2014,
arXiv 1312.6120, where depth is what makes learning curves sigmoidal).

A clamp here is the same value-plus-mask idea as `icldyn.clamps`: the clamped
factor's gradient is zeroed and `where(mask, target, value)` is applied after
every update, so it stays bit-for-bit equal to its target.

Defaults (dim 16, init norm 0.1, learning rate 0.1, 4000 steps) and what they
gave on CPU for seeds 0..7, step where the loss falls below ½ its initial
value: unclamped 250–887 (median 539); each seed stays within 1 % of its
initial loss for the first 81–95 % of that time and then falls from 90 % to
10 % of it in 22 steps. Clamping a gives 35–80 (median 44), b 31–52 (median
33), c 28–91 (median 38). The unclamped time varies a lot between seeds
because it scales like 1 / (initial overlaps), which is heavy-tailed: over
seeds 0..255 the 50/95/99th percentiles were about 645/2220/3340 steps and 5
seeds (2 %) were still on the plateau at step 4000. Training one condition
for 8 seeds takes ~10 ms after a ~1 s compilation that all conditions share.

Public API: `ToyConfig`, `ToyTrajectory`, `make_target`, `init_factors`,
`toy_loss`, `toy_grad`, `alignment`, `train_toy`, `transition_step`, `plot_toy`,
`run_toy_study`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FACTORS = ('a', 'b', 'c')
CLAMPS = (None,) + FACTORS
UNCLAMPED = 'unclamped'

# Distinct fold_in tags keep the target and the initialisation independent even
# when an init seed equals the target seed (with a bare `key(seed)` for both,
# seed == target_seed would start every factor exactly along its target).
_TARGET_STREAM = 0
_INIT_STREAM = 1


def condition_name(clamp: str | None) -> str:
  """CSV/plot name of a clamp condition: 'unclamped' or 'clamp_<factor>'."""
  return UNCLAMPED if clamp is None else f'clamp_{clamp}'


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
  return (isinstance(x, (int, float, np.integer, np.floating))
          and not isinstance(x, (bool, np.bool_)) and math.isfinite(x))


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """Settings of one toy condition.

  Attributes:
    dim: length D of each factor vector (the target tensor is D×D×D).
    init_scale: expected norm of each factor at initialisation; entries are
      drawn N(0, init_scale² / dim). The plateau length scales like
      √dim / (learning_rate · init_scale).
    learning_rate: plain gradient-descent step size. Near the solution the
      loss Hessian has top eigenvalue 3 (the joint rescaling of the three unit
      factors), so gradient descent is unstable there above 2/3.
    num_steps: number of gradient steps.
    clamp: None, or which factor ('a', 'b' or 'c') is held at its target.
    target_seed: seed of the target factors a*, b*, c* (unit vectors).
    log_every: record metrics every this many steps; must divide num_steps.
  """

  dim: int = 16
  init_scale: float = 0.1
  learning_rate: float = 0.1
  num_steps: int = 4000
  clamp: str | None = None
  target_seed: int = 0
  log_every: int = 5

  def __post_init__(self):
    if not _is_int(self.dim) or self.dim < 1:
      raise ValueError(f'ToyConfig.dim must be an int >= 1, got {self.dim!r}')
    if not _is_real(self.init_scale) or self.init_scale <= 0:
      raise ValueError('ToyConfig.init_scale must be a finite number > 0, '
                       f'got {self.init_scale!r}')
    if not _is_real(self.learning_rate) or self.learning_rate <= 0:
      raise ValueError('ToyConfig.learning_rate must be a finite number > 0, '
                       f'got {self.learning_rate!r}')
    if not _is_int(self.num_steps) or self.num_steps < 1:
      raise ValueError(
          f'ToyConfig.num_steps must be an int >= 1, got {self.num_steps!r}')
    if self.clamp not in CLAMPS:
      raise ValueError(f'ToyConfig.clamp must be one of {CLAMPS}, '
                       f'got {self.clamp!r}')
    if not _is_int(self.target_seed) or not 0 <= self.target_seed < 2**31:
      raise ValueError('ToyConfig.target_seed must be an int in [0, 2^31), '
                       f'got {self.target_seed!r}')
    if not _is_int(self.log_every) or self.log_every < 1:
      raise ValueError(
          f'ToyConfig.log_every must be an int >= 1, got {self.log_every!r}')
    if self.num_steps % self.log_every:
      raise ValueError(f'ToyConfig.log_every ({self.log_every}) must divide '
                       f'ToyConfig.num_steps ({self.num_steps})')

  @classmethod
  def from_mapping(cls, fields: Mapping[str, Any]) -> ToyConfig:
    """Builds a config from a mapping (e.g. `ConfigDict.to_dict()`).

    Args:
      fields: any subset of the dataclass fields; the rest keep defaults.

    Returns:
      The validated config.

    Raises:
      ValueError: on an unknown field name or an invalid value.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f'ToyConfig has no field(s) {unknown}; '
                       f'known: {sorted(known)}')
    return cls(**dict(fields))


class ToyTrajectory(NamedTuple):
  """Logged metrics of one condition for S seeds at n logged steps.

  Alignments are signed cosines: flipping the signs of two factors leaves
  a⊗b⊗c unchanged, so a converged factor sits at +1 or -1 (compare |cos|).

  Attributes:
    steps: [n] int32, gradient steps taken when each entry was logged
      (0, log_every, ..., num_steps).
    loss: [S, n] float32, ½‖a⊗b⊗c − T*‖²_F.
    align_a: [S, n] float32, cosine similarity of a with a*.
    align_b: [S, n] float32, cosine similarity of b with b*.
    align_c: [S, n] float32, cosine similarity of c with c*.
    factors: [S, n, 3, D] float32, the factors (a, b, c) themselves.
    target: [3, D] float32, the target factors (a*, b*, c*).
  """

  steps: Any
  loss: Any
  align_a: Any
  align_b: Any
  align_c: Any
  factors: Any
  target: Any


@functools.partial(jax.jit, static_argnames='dim')
def make_target(dim: int, target_seed: int | jax.Array) -> jax.Array:
  """Draws the target factors: three independent random unit vectors.

  Unit norms make ‖T*‖_F = 1, so every condition starts at loss ≈ ½ and the
  clamped factor has the same scale as the learned ones will reach.

  Args:
    dim: length D of each factor.
    target_seed: seed of the draw.

  Returns:
    [3, D] float32, rows a*, b*, c*.
  """
  key = jax.random.fold_in(jax.random.key(target_seed), _TARGET_STREAM)
  t = jax.random.normal(key, (3, dim), jnp.float32)
  return t / jnp.linalg.norm(t, axis=-1, keepdims=True)


def init_factors(key: jax.Array, dim: int, init_scale: float | jax.Array
                 ) -> jax.Array:
  """Small random factors, each of expected norm `init_scale`.

  Args:
    key: a typed PRNG key (scalar).
    dim: length D of each factor.
    init_scale: expected norm of each factor (scalar).

  Returns:
    [3, D] float32, rows a, b, c.
  """
  return (init_scale / math.sqrt(dim)) * jax.random.normal(
      key, (3, dim), jnp.float32)


def toy_loss(factors: jax.Array, target: jax.Array) -> jax.Array:
  """½‖a⊗b⊗c − a*⊗b*⊗c*‖²_F without forming the D³ tensor.

  Expands the square with ‖a⊗b⊗c‖² = ‖a‖²‖b‖²‖c‖² and
  ⟨a⊗b⊗c, a*⊗b*⊗c*⟩ = (a·a*)(b·b*)(c·c*): O(D) instead of O(D³). In float32
  the three terms cancel near the optimum, so a converged loss reads as
  rounding noise of about ±1e-7 (it can be slightly negative) instead of 0;
  that is far below any level we measure.

  Args:
    factors: [3, D], rows a, b, c.
    target: [3, D], rows a*, b*, c*.

  Returns:
    [] the loss.
  """
  sq = jnp.prod(jnp.sum(factors * factors, axis=-1))
  cross = jnp.prod(jnp.sum(factors * target, axis=-1))
  target_sq = jnp.prod(jnp.sum(target * target, axis=-1))
  return 0.5 * (sq - 2.0 * cross + target_sq)


def toy_grad(factors: jax.Array, target: jax.Array) -> jax.Array:
  """Gradient of `toy_loss` with respect to the factors, in closed form.

  ∂L/∂a = a ‖b‖²‖c‖² − a* (b·b*)(c·c*), and cyclically for b and c: each
  factor's pull towards its target is scaled by the other two factors'
  overlaps, which is the multiplicative coupling behind the plateau. Written
  out rather than left to `jax.grad` because it is the object of study, and
  because the smaller program compiles noticeably faster on CPU.

  Args:
    factors: [3, D], rows a, b, c.
    target: [3, D], rows a*, b*, c*.

  Returns:
    [3, D], rows ∂L/∂a, ∂L/∂b, ∂L/∂c.
  """
  sq = jnp.sum(factors * factors, axis=-1)  # [3]
  cross = jnp.sum(factors * target, axis=-1)  # [3]
  # Row i needs the product over the other two rows; rolling by 1 and 2 lines
  # them up without dividing (which would fail for an all-zero factor).
  sq_others = jnp.roll(sq, 1) * jnp.roll(sq, 2)
  cross_others = jnp.roll(cross, 1) * jnp.roll(cross, 2)
  return factors * sq_others[:, None] - target * cross_others[:, None]


def alignment(factors: jax.Array, target: jax.Array) -> jax.Array:
  """Cosine similarity of each factor with its target.

  Args:
    factors: [3, D], rows a, b, c.
    target: [3, D], rows a*, b*, c*.

  Returns:
    [3] cos(a, a*), cos(b, b*), cos(c, c*); 0 for an all-zero factor.
  """
  dots = jnp.sum(factors * target, axis=-1)
  norms = jnp.linalg.norm(factors, axis=-1) * jnp.linalg.norm(target, axis=-1)
  return jnp.where(norms > 0, dots / jnp.where(norms > 0, norms, 1.0), 0.0)


def clamp_mask(clamp: str | None) -> np.ndarray:
  """[3] bool, True for the factor held at its target."""
  if clamp not in CLAMPS:
    raise ValueError(f'clamp must be one of {CLAMPS}, got {clamp!r}')
  return np.array([clamp == f for f in FACTORS])


def _apply_clamp(factors: jax.Array, target: jax.Array, mask: jax.Array
                 ) -> jax.Array:
  # mask [3] -> [3, 1] so one flag covers a whole factor.
  return jnp.where(mask[:, None], target, factors)


@functools.partial(jax.jit, static_argnames=('dim', 'num_steps', 'log_every'))
def _train(seeds, target_seed, mask, init_scale, learning_rate, *, dim,
           num_steps, log_every):
  """Jitted core of `train_toy`; returns (loss, align, factors), target.

  Everything that can differ between conditions without changing shapes (the
  clamp mask, rates, the target seed) is a traced argument, so all conditions
  of a study share one compiled program. The target is drawn in here rather
  than passed in because a separate program for it would be a second
  compilation of the PRNG, which dominates compile time on CPU.
  """
  target = make_target(dim, target_seed)

  def log(factors):
    # The stored factors already hold the clamp (written back every step).
    return toy_loss(factors, target), alignment(factors, target), factors

  def step(factors, _):
    # Zero gradient into the clamped factor, then write its target back: the
    # stored value stays bit-for-bit the target, as a clamp in the model does.
    grad = jnp.where(mask[:, None], 0.0, toy_grad(factors, target))
    return _apply_clamp(factors - learning_rate * grad, target, mask), None

  def chunk(factors, _):
    # Log first, then step: every logged value (step 0 included) is computed
    # at the same point of the same loop body. Logging step 0 outside the loop
    # instead lets XLA fuse it differently per batch size, which broke the
    # bitwise equality of vmapped and single-seed runs by 1 ulp. The last
    # chunk's steps are wasted (log_every steps), which is negligible.
    metrics = log(factors)
    factors, _ = jax.lax.scan(step, factors, None, length=log_every)
    return factors, metrics

  def one_seed(seed):
    key = jax.random.fold_in(jax.random.key(seed), _INIT_STREAM)
    factors = _apply_clamp(init_factors(key, dim, init_scale), target, mask)
    _, logged = jax.lax.scan(chunk, factors, None,
                             length=num_steps // log_every + 1)
    return logged

  return jax.vmap(one_seed)(seeds), target


def train_toy(cfg: ToyConfig, seeds: jax.Array | Sequence[int]
              ) -> ToyTrajectory:
  """Trains one condition for several initialisation seeds at once.

  Plain gradient descent, `lax.scan` over steps, `vmap` over seeds. Seeds
  only change the initialisation; the target comes from `cfg.target_seed`,
  so every seed and every clamp condition fits the same tensor, and a seed
  starts from the same a, b, c in every condition (apart from the clamped
  factor).

  Args:
    cfg: the condition.
    seeds: [S] non-negative integer initialisation seeds.

  Returns:
    The trajectory, with a leading seed axis of size S on the per-seed fields.

  Raises:
    ValueError: if `seeds` is not a non-empty 1-D array of integers.
  """
  seeds_np = np.asarray(seeds)
  if (seeds_np.ndim != 1 or seeds_np.size == 0
      or not np.issubdtype(seeds_np.dtype, np.integer)):
    raise ValueError('seeds must be a non-empty 1-D integer array, got '
                     f'shape {seeds_np.shape} dtype {seeds_np.dtype}')
  if (seeds_np < 0).any() or (seeds_np >= 2**31).any():
    raise ValueError(f'seeds must be in [0, 2^31), got {seeds_np.tolist()}')
  (loss, align, factors), target = _train(
      jnp.asarray(seeds_np, jnp.int32), jnp.int32(cfg.target_seed),
      jnp.asarray(clamp_mask(cfg.clamp)),
      jnp.float32(cfg.init_scale), jnp.float32(cfg.learning_rate),
      dim=cfg.dim, num_steps=cfg.num_steps, log_every=cfg.log_every)
  # Host-side arange: a device op here would cost a compilation per shape.
  steps = jnp.asarray(
      np.arange(cfg.num_steps // cfg.log_every + 1, dtype=np.int32)
      * cfg.log_every)
  return ToyTrajectory(steps=steps, loss=loss, align_a=align[..., 0],
                       align_b=align[..., 1], align_c=align[..., 2],
                       factors=factors, target=target)


def transition_step(traj: ToyTrajectory, level: float = 0.5) -> np.ndarray:
  """Step at which each seed's loss first falls below `level` × its start.

  Linear interpolation between the two logged steps around the crossing, so
  the answer does not snap to the logging grid.

  Args:
    traj: a trajectory (host or device arrays).
    level: fraction of the initial loss, in (0, 1).

  Returns:
    [S] float64 interpolated crossing steps; NaN for a seed that never
    crosses.
  """
  if not 0 < level < 1:
    raise ValueError(f'level must be in (0, 1), got {level!r}')
  steps = np.asarray(traj.steps, np.float64)
  loss = np.asarray(traj.loss, np.float64)
  out = np.full(loss.shape[0], np.nan)
  for s, curve in enumerate(loss):
    threshold = level * curve[0]
    below = np.flatnonzero(curve < threshold)
    if below.size == 0:
      continue
    i = below[0]
    if i == 0:  # impossible for a positive start, kept for safety
      out[s] = steps[0]
      continue
    l0, l1 = curve[i - 1], curve[i]
    frac = (l0 - threshold) / (l0 - l1)
    out[s] = steps[i - 1] + frac * (steps[i] - steps[i - 1])
  return out


_COLORS = {UNCLAMPED: 'black', 'clamp_a': 'tab:blue', 'clamp_b': 'tab:orange',
           'clamp_c': 'tab:green'}


def plot_toy(trajs: Mapping[str, ToyTrajectory], path: str | pathlib.Path,
             level: float = 0.5) -> None:
  """Loss and per-factor alignment against step, one colour per condition.

  Thin lines are seeds; dashed vertical lines mark each condition's median
  transition step (`transition_step` at `level`). matplotlib is imported here
  so that importing `icldyn.toy` stays cheap.

  Args:
    trajs: condition name -> trajectory (host arrays are fine).
    path: where to write the PNG.
    level: the transition level marked on the loss panel.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
  # Fixed margins: constrained/tight layout measure every tick label and cost
  # more than drawing the whole figure.
  fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.84,
                      wspace=0.22)
  for name, traj in trajs.items():
    color = _COLORS.get(name)
    # Log-spaced steps: the clamped transitions (tens of steps) and the
    # unclamped ones (hundreds to thousands) both need to be visible. Step 0
    # is dropped for the log axis; it equals the plateau value anyway.
    steps = np.asarray(traj.steps)[1:]
    panels = (traj.loss, np.abs(traj.align_a), np.abs(traj.align_b),
              np.abs(traj.align_c))
    for ax, values in zip(axes, panels):
      values = np.asarray(values)[:, 1:]
      for s, curve in enumerate(values):
        ax.plot(steps, curve, color=color, lw=0.8, alpha=0.6,
                label=name if s == 0 else None)
    t = transition_step(traj, level)
    if np.isfinite(t).any():
      axes[0].axvline(np.nanmedian(t), color=color, ls='--', lw=1)
  axes[0].set_ylabel('loss ½‖a⊗b⊗c − T*‖²')
  axes[0].set_title(f'loss (dashed: median step below {level:g}× initial)')
  axes[0].legend(loc='lower left')
  for ax, f in zip(axes[1:], FACTORS):
    # |cos|: the loss is unchanged when two factors flip sign together, so
    # a learned factor ends at cos = +1 or -1 and both mean "aligned".
    ax.set_title(f'alignment |cos({f}, {f}*)|')
    ax.set_ylim(-0.02, 1.02)
  for ax in axes:
    ax.set_xscale('log')
    ax.set_xlabel('step')
  fig.suptitle('Rank-1 tensor toy model: clamping one factor shortens the '
               'plateau (cf. Singh et al. 2024, Fig. 5a)')
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_toy_study(outdir: str | pathlib.Path, cfg_base: ToyConfig,
                  seeds: jax.Array | Sequence[int],
                  clamps: Sequence[str] = FACTORS,
                  level: float = 0.5) -> dict[str, Any]:
  """Trains the unclamped and each clamped condition; writes CSVs and a plot.

  Writes into `outdir`:
    toy_metrics.csv      condition,seed,step,loss,align_a,align_b,align_c
    toy_transitions.csv  condition,seed,transition_step (empty when never)
    toy.png              `plot_toy` of all conditions

  Args:
    outdir: output directory (created if missing).
    cfg_base: settings shared by all conditions; its `clamp` is ignored.
    seeds: [S] initialisation seeds, the same for every condition.
    clamps: which factors to clamp, one condition each.
    level: transition level, a fraction of the initial loss.

  Returns:
    condition name -> {'clamp', 'n_seeds', 'n_crossed', 'median', 'mean',
    'min', 'max', 'transition_steps'} (steps as floats, NaN if never).
  """
  for c in clamps:
    if c not in FACTORS:
      raise ValueError(f'clamps must be drawn from {FACTORS}, got {c!r}')
  outdir = pathlib.Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  seeds_np = np.asarray(seeds)

  trajs = {}
  for clamp in (None,) + tuple(clamps):
    cfg = dataclasses.replace(cfg_base, clamp=clamp)
    # One device_get per condition; everything below is host-side.
    trajs[condition_name(clamp)] = jax.device_get(train_toy(cfg, seeds_np))

  summary = {}
  with open(outdir / 'toy_metrics.csv', 'w', newline='') as fm, \
       open(outdir / 'toy_transitions.csv', 'w', newline='') as ft:
    metrics = csv.writer(fm)
    metrics.writerow(['condition', 'seed', 'step', 'loss', 'align_a',
                      'align_b', 'align_c'])
    transitions = csv.writer(ft)
    transitions.writerow(['condition', 'seed', 'transition_step'])
    for (name, traj), clamp in zip(trajs.items(), (None,) + tuple(clamps)):
      for s, seed in enumerate(seeds_np.tolist()):
        for i, step in enumerate(np.asarray(traj.steps).tolist()):
          metrics.writerow([name, seed, step, f'{traj.loss[s, i]:.9g}',
                            f'{traj.align_a[s, i]:.7g}',
                            f'{traj.align_b[s, i]:.7g}',
                            f'{traj.align_c[s, i]:.7g}'])
      t = transition_step(traj, level)
      for seed, ts in zip(seeds_np.tolist(), t.tolist()):
        transitions.writerow([name, seed, '' if math.isnan(ts) else f'{ts:.6g}'])
      crossed = t[np.isfinite(t)]
      summary[name] = {
          'clamp': clamp,
          'n_seeds': int(t.size),
          'n_crossed': int(crossed.size),
          'median': float(np.median(crossed)) if crossed.size else math.nan,
          'mean': float(np.mean(crossed)) if crossed.size else math.nan,
          'min': float(np.min(crossed)) if crossed.size else math.nan,
          'max': float(np.max(crossed)) if crossed.size else math.nan,
          'transition_steps': t.tolist(),
      }
      logging.info('toy %s: %d/%d seeds cross %.2g x initial loss, median '
                   'step %.1f', name, crossed.size, t.size, level,
                   summary[name]['median'])

  plot_toy(trajs, outdir / 'toy.png', level)
  return summary
