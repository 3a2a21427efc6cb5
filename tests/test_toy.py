"""Tests for icldyn.toy: the rank-1 tensor toy model of phase changes.

All trajectories share one config and one seed set, so the whole file needs
two compilations of the training program (S = 4 and S = 1).
"""

import csv
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icldyn import cli
from icldyn import toy

CFG = toy.ToyConfig()  # the documented defaults are what we test
SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope='module')
def trajs():
  """Host trajectories of every condition, keyed by condition name."""
  return {
      toy.condition_name(c): jax.device_get(
          toy.train_toy(dataclasses.replace(CFG, clamp=c), SEEDS))
      for c in toy.CLAMPS
  }


def _materialised_loss(factors, target):
  """½‖a⊗b⊗c − a*⊗b*⊗c*‖² by building both D³ tensors (jnp, differentiable)."""
  tensor = jnp.einsum('i,j,k->ijk', *factors)
  target_tensor = jnp.einsum('i,j,k->ijk', *target)
  return 0.5 * jnp.sum((tensor - target_tensor) ** 2)


def test_closed_form_loss_matches_materialised_tensor():
  rng = np.random.default_rng(0)
  for dim in (1, 16):
    factors = rng.normal(size=(3, dim))
    target = rng.normal(size=(3, dim))  # not unit: the identity is general
    # Independent float64 reference in numpy.
    diff = (np.einsum('i,j,k->ijk', *factors)
            - np.einsum('i,j,k->ijk', *target))
    expected = 0.5 * np.sum(diff**2)
    got = jax.jit(toy.toy_loss)(jnp.asarray(factors, jnp.float32),
                                jnp.asarray(target, jnp.float32))
    np.testing.assert_allclose(float(got), expected, rtol=1e-4)


def test_gradient_matches_materialised_gradient():
  rng = np.random.default_rng(1)
  factors = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
  # jit: op-by-op gradients compile every primitive separately (seconds).
  expected = jax.jit(jax.grad(_materialised_loss))(factors, target)
  np.testing.assert_allclose(jax.jit(toy.toy_grad)(factors, target), expected,
                             rtol=1e-4, atol=1e-5)


def test_unclamped_plateau_then_abrupt_drop(trajs):
  traj = trajs[toy.UNCLAMPED]
  loss = traj.loss / traj.loss[:, :1]
  t90 = toy.transition_step(traj, 0.9)
  t50 = toy.transition_step(traj, 0.5)
  t10 = toy.transition_step(traj, 0.1)
  assert np.isfinite(t10).all(), t10
  # Ends far below 10 % of the start (converged runs read ~1e-7).
  assert (loss[:, -1] < 0.01).all(), loss[:, -1]
  for s in range(len(SEEDS)):
    # Plateau: for the first 75 % of the time to the midpoint the loss moves
    # by < 3 %. The escape is a finite-time blow-up, overlaps ~ 1/(1 - t/T),
    # so at 0.75 T they are only ~4x their ~0.03 start and the loss has moved
    # < 1 % (seen: <= 0.85 %); an exponential decay with the same midpoint
    # would have lost 1 - 2**-0.75 ~ 41 % by then.
    early = traj.steps < 0.75 * t50[s]
    assert np.abs(loss[s, early] - 1).max() < 0.03, s
    # It is a real plateau, not a few steps: it outlasts by far the clamped
    # transitions (< 100 steps) and spans > 5 % of the run.
    assert t90[s] > 0.05 * CFG.num_steps, t90
    # Abrupt: the 90 % -> 10 % fall takes < 25 % of the time spent reaching
    # 90 %. A smooth exponential decay gives ln 9 / ln(1/0.9) ~ 21 for this
    # ratio; the multiplicative model gives 0.03-0.1 (22 steps vs 230-880).
    assert (t10[s] - t90[s]) < 0.25 * t90[s], (t10, t90)
    assert (t10[s] - t90[s]) < 0.02 * CFG.num_steps, (t10, t90)


@pytest.mark.parametrize('clamp', toy.FACTORS)
def test_clamping_a_factor_moves_the_transition_earlier(trajs, clamp):
  free = toy.transition_step(trajs[toy.UNCLAMPED], 0.5)
  clamped = toy.transition_step(trajs[toy.condition_name(clamp)], 0.5)
  assert np.isfinite(clamped).all(), clamped
  # Theory: ~log(1/eps)/lr versus ~1/(eps lr) steps, a factor > 5 here (seen
  # 5-18x); halving is a conservative bar that a mere shift would not pass.
  assert (clamped < 0.5 * free).all(), (clamped, free)


@pytest.mark.parametrize('clamp', toy.FACTORS)
def test_clamped_factor_stays_exactly_at_target(trajs, clamp):
  traj = trajs[toy.condition_name(clamp)]
  i = toy.FACTORS.index(clamp)
  held = traj.factors[:, :, i, :]  # [S, n, D]
  assert np.array_equal(held, np.broadcast_to(traj.target[i], held.shape))
  # The other factors do move, and start where the unclamped run starts.
  free_start = trajs[toy.UNCLAMPED].factors[:, 0]
  others = [j for j in range(3) if j != i]
  assert np.array_equal(traj.factors[:, 0, others], free_start[:, others])
  assert not np.array_equal(traj.factors[:, 0, others],
                            traj.factors[:, -1, others])


def test_vmapped_seeds_equal_separate_runs(trajs):
  batched = trajs[toy.UNCLAMPED]
  for s, seed in enumerate(SEEDS):
    single = jax.device_get(toy.train_toy(CFG, [seed]))
    for field in ('loss', 'align_a', 'align_b', 'align_c', 'factors'):
      # One seed and four seeds are programs of different shapes, which XLA
      # CPU may vectorise differently per instruction set (README,
      # Determinism). Measured bitwise equal under SSE4.2, AVX, AVX2 and the
      # host's own code generation (tests/test_isa.py runs this under each);
      # 1e-5 relative leaves room for a few ulp of reordering amplified over
      # the run while still failing on any change of the dynamics.
      np.testing.assert_allclose(getattr(single, field)[0], getattr(batched, field)[s],
                                 rtol=1e-5, atol=1e-7, err_msg=field)


def test_transition_step_interpolates_and_reports_never():
  traj = toy.ToyTrajectory(
      steps=np.array([0, 10, 20, 30]),
      loss=np.array([[1.0, 0.9, 0.3, 0.1],     # crosses 0.5 between 10 and 20
                     [1.0, 0.99, 0.98, 0.97]]),  # never
      align_a=None, align_b=None, align_c=None, factors=None, target=None)
  t = toy.transition_step(traj, 0.5)
  np.testing.assert_allclose(t[0], 10 + 10 * (0.9 - 0.5) / (0.9 - 0.3))
  assert np.isnan(t[1])
  with pytest.raises(ValueError, match='level'):
    toy.transition_step(traj, 1.5)


@pytest.mark.parametrize('field, value', [
    ('dim', 0), ('init_scale', -1.0), ('learning_rate', float('nan')),
    ('num_steps', 0), ('clamp', 'd'), ('target_seed', -1), ('log_every', 0),
    ('log_every', 3),  # does not divide num_steps = 4000
])
def test_config_validation_names_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(CFG, **{field: value})


def test_from_mapping_rejects_unknown_fields():
  assert toy.ToyConfig.from_mapping({'dim': 8}).dim == 8
  with pytest.raises(ValueError, match='dims'):
    toy.ToyConfig.from_mapping({'dims': 8})


def test_toy_command_writes_outputs(tmp_path, capsys):
  # `icldyn toy --config STUDY --workdir DIR` on a study file of this module's
  # config: the command maps it onto run_toy_study (the trajectories compile
  # as the fixture's did).
  study = tmp_path / 'toy_study.py'
  study.write_text(
      'import ml_collections\n'
      'def get_config(arg=""):\n'
      '  c = ml_collections.ConfigDict()\n'
      f'  c.toy = ml_collections.ConfigDict({dataclasses.asdict(CFG)!r})\n'
      f'  c.init_seeds = {SEEDS!r}\n'
      "  c.clamps = ('c',)\n"
      '  c.level = 0.5\n'
      '  return c\n')
  out = tmp_path / 'out'
  assert cli.main(['toy', '--config', str(study), '--workdir', str(out)]) == 0
  err = capsys.readouterr().err
  medians = {}
  for line in err.splitlines():
    if 'transition median' in line:
      cond, _, rest = line.strip().partition(': transition median ')
      medians[cond] = float(rest.split()[0])
  assert set(medians) == {'unclamped', 'clamp_c'}
  assert medians['clamp_c'] < medians['unclamped']
  tmp_path = out
  with open(tmp_path / 'toy_metrics.csv') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['condition', 'seed', 'step', 'loss', 'align_a',
                           'align_b', 'align_c']
  n_logged = CFG.num_steps // CFG.log_every + 1
  assert len(rows) == 2 * len(SEEDS) * n_logged
  with open(tmp_path / 'toy_transitions.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['condition'], int(r['seed'])) for r in rows] == [
      (c, s) for c in ('unclamped', 'clamp_c') for s in SEEDS]
  assert (tmp_path / 'toy.png').stat().st_size > 0
