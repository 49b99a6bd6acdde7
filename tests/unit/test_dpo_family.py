"""DPO's family of losses (config.train.dpo.loss): each against its paper's formula written
out here on hand-made log-probs, its gradient against finite differences of that formula,
and the reference model left out entirely where a loss reads none; the runs are in
tests/integration/test_dpo_family_runs.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import default, dpo as dpo_config
from lm import objectives
from lm.objectives import dpo
from lm.errors import ConfigError

# Three pairs; column 0 the chosen response, 1 the rejected. Summed log-probs over each
# response, and its length in tokens: chosen and rejected differ in length, and so do
# the pairs, so that a missing or misplaced length normalisation changes the loss.
POLICY = np.array([[-12.0, -20.0], [-30.0, -18.0], [-5.0, -9.0]])
REFERENCE = np.array([[-14.0, -19.0], [-28.0, -20.0], [-6.0, -6.0]])
LENGTHS = np.array([[4.0, 5.0], [10.0, 6.0], [2.0, 3.0]])
BETA, EPS, GAMMA, LAMBDA = 0.3, 0.2, 0.4, 0.7


def log_sigmoid(x):
  return -math.log1p(math.exp(-x))


# The papers' formulas for one pair, from its four summed log-probs (w: chosen, l:
# rejected) and two lengths, in float64.
def sigmoid(pw, pl, rw, rl, lw, ll, eps=0.0):
  """Rafailov et al. 2023, eq. 7; with eps, cDPO (Mitchell 2023)."""
  h = (pw - rw) - (pl - rl)
  return -(1 - eps) * log_sigmoid(BETA * h) - eps * log_sigmoid(-BETA * h)


def robust(pw, pl, rw, rl, lw, ll):
  """Chowdhury et al. 2024: ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps), l DPO's loss."""
  h = (pw - rw) - (pl - rl)
  dpo_loss = lambda h: -log_sigmoid(BETA * h)
  return ((1 - EPS) * dpo_loss(h) - EPS * dpo_loss(-h)) / (1 - 2 * EPS)


def ipo(pw, pl, rw, rl, lw, ll):
  """Azar et al. 2023, eq. 17 (tau = beta), on log-ratios averaged over tokens."""
  h = (pw - rw) / lw - (pl - rl) / ll
  return (h - 1 / (2 * BETA)) ** 2


def hinge(pw, pl, rw, rl, lw, ll):
  """SLiC's hinge on reference-normalised likelihoods: max(0, 1 - beta h)."""
  return max(0.0, 1 - BETA * ((pw - rw) - (pl - rl)))


def simpo(pw, pl, rw, rl, lw, ll):
  """Meng et al. 2024, eq. 6."""
  return -log_sigmoid(BETA / lw * pw - BETA / ll * pl - GAMMA)


def orpo(pw, pl, rw, rl, lw, ll):
  """Hong et al. 2024, eqs. 4, 6, 7: NLL per token plus lambda L_OR, with odds(y) =
  P / (1 - P) and P = exp(log-prob per token)."""
  odds = lambda log_prob, length: math.exp(log_prob / length) / (1 - math.exp(log_prob / length))
  return -pw / lw - LAMBDA * log_sigmoid(math.log(odds(pw, lw) / odds(pl, ll)))


CASES = {  # name: (config.train.dpo.loss, settings, the formula)
    'dpo': ('sigmoid', dict(beta=BETA), sigmoid),
    'cdpo': ('sigmoid', dict(beta=BETA, label_smoothing=EPS),
             lambda *pair: sigmoid(*pair, eps=EPS)),
    'robust': ('robust', dict(beta=BETA, label_smoothing=EPS), robust),
    'ipo': ('ipo', dict(beta=BETA), ipo),
    'hinge': ('hinge', dict(beta=BETA), hinge),
    'simpo': ('simpo', dict(beta=BETA, simpo_gamma=GAMMA), simpo),
    'orpo': ('orpo', dict(orpo_lambda=LAMBDA, beta=BETA), orpo),
}


def formula_sum(formula, policy):
  return sum(formula(*policy[i], *REFERENCE[i], *LENGTHS[i]) for i in range(len(policy)))


def implementation(case, policy, nll_weight=0.0):
  """The summed loss and metrics of dpo.preference_loss; the reference is given only to a
  loss that reads it."""
  loss, settings, _ = CASES[case]
  reference = (jnp.asarray(REFERENCE, jnp.float32)
               if dpo.DPO_LOSSES[loss].needs_reference else None)
  pairs = dpo.PreferencePairs(jnp.asarray(policy, jnp.float32), reference,
                              jnp.asarray(LENGTHS, jnp.float32))
  return dpo.preference_loss(pairs, dpo.Settings(loss=loss, nll_weight=nll_weight, **settings))


@pytest.mark.parametrize('case', sorted(CASES))
def test_each_loss_is_its_papers_formula(case):
  want = formula_sum(CASES[case][2], POLICY)
  np.testing.assert_allclose(implementation(case, POLICY)['loss'], want, rtol=1e-5)
  # RPO's NLL term adds to any of them.
  chosen_nll = np.sum(-POLICY[:, 0] / LENGTHS[:, 0])
  np.testing.assert_allclose(implementation(case, POLICY, nll_weight=0.5)['loss'],
                             want + 0.5 * chosen_nll, rtol=1e-5)


def test_the_cases_tell_the_losses_apart():
  """So that each formula above checks something: on these pairs no two losses agree."""
  values = [formula_sum(formula, POLICY) for _, _, formula in CASES.values()]
  assert min(abs(a - b) for i, a in enumerate(values) for b in values[:i]) > 0.05
  hinge_terms = [hinge(*POLICY[i], *REFERENCE[i], *LENGTHS[i]) for i in range(3)]
  assert 0 in hinge_terms and max(hinge_terms) > 0  # Both sides of the hinge's kink.


@pytest.mark.parametrize('case', sorted(CASES))
def test_each_loss_has_its_formulas_gradient(case):
  """jax.grad of the implementation against central differences of the formula in float64,
  with respect to every policy log-prob."""
  formula = CASES[case][2]
  grads = jax.grad(lambda policy: implementation(case, policy)['loss'])(
      jnp.asarray(POLICY, jnp.float32))
  want, step = np.zeros_like(POLICY), 1e-5
  for index in np.ndindex(*POLICY.shape):
    up, down = POLICY.copy(), POLICY.copy()
    up[index] += step
    down[index] -= step
    want[index] = (formula_sum(formula, up) - formula_sum(formula, down)) / (2 * step)
  np.testing.assert_allclose(grads, want, rtol=1e-4, atol=1e-6)
  # Every loss pushes these chosen responses up (IPO too: each h is below its target).
  assert np.all(want[:, 0] <= 1e-9) and np.any(want[:, 0] < 0)


def test_robust_dpo_is_unbiased_under_label_flips():
  """Chowdhury et al.'s point: averaged over a label kept with probability 1 - eps and
  flipped with eps, the robust loss is DPO's on the true label (cDPO's is not)."""
  def total(loss, swap=False, label_smoothing=EPS):
    arrays = [x[:, ::-1] if swap else x for x in (POLICY, REFERENCE, LENGTHS)]
    pairs = dpo.PreferencePairs(*(jnp.asarray(x, jnp.float32) for x in arrays))
    settings = dpo.Settings(loss=loss, beta=BETA, label_smoothing=label_smoothing)
    return float(dpo.preference_loss(pairs, settings)['loss'])
  dpo_loss = total('sigmoid', label_smoothing=0.0)
  averaged = lambda loss: (1 - EPS) * total(loss) + EPS * total(loss, swap=True)
  np.testing.assert_allclose(averaged('robust'), dpo_loss, rtol=1e-5)
  assert abs(averaged('sigmoid') - dpo_loss) > 0.1


def test_metrics_are_rewards_with_a_reference_and_per_token_log_probs_without():
  sums = implementation('ipo', POLICY)
  rewards = BETA * (POLICY - REFERENCE)
  margins = rewards[:, 0] - rewards[:, 1]
  np.testing.assert_allclose(sums['reward_margin'], margins.sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['chosen_reward'], rewards[:, 0].sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['rejected_reward'], rewards[:, 1].sum(), rtol=1e-5)
  assert sums['reward_accuracy'] == np.sum(margins > 0) == 2
  assert 'log_prob_margin' not in sums

  per_token = POLICY / LENGTHS
  for case in ('simpo', 'orpo'):
    sums = implementation(case, POLICY)
    assert not {'reward_margin', 'reward_accuracy', 'chosen_reward'} & set(sums)
    np.testing.assert_allclose(sums['log_prob_margin'],
                               np.sum(per_token[:, 0] - per_token[:, 1]), rtol=1e-5)
    np.testing.assert_allclose(sums['chosen_log_prob'], per_token[:, 0].sum(), rtol=1e-5)
    np.testing.assert_allclose(sums['rejected_log_prob'], per_token[:, 1].sum(), rtol=1e-5)
    # Per token, pairs 0 and 2 prefer the chosen; pair 1 ties (-3 each), which is no win.
    assert sums['log_prob_accuracy'] == np.sum(per_token[:, 0] > per_token[:, 1])
    np.testing.assert_allclose(sums['chosen_nll'], -per_token[:, 0].sum(), rtol=1e-5)
  log_odds = per_token - np.log1p(-np.exp(per_token))  # ORPO's, logged as well.
  np.testing.assert_allclose(implementation('orpo', POLICY)['log_odds_ratio'],
                             np.sum(log_odds[:, 0] - log_odds[:, 1]), rtol=1e-5)


def test_orpo_stays_finite_when_a_response_is_certain():
  """A float32 log-softmax rounds to 0 where p ~ 1: log(1 - P) must not become -inf."""
  # (Three pairs, as above: the same shapes reuse what the other ORPO tests compiled.)
  policy = jnp.array([[0.0, -3.0], [-2.0, 0.0], [-1.0, -2.0]])
  pairs = lambda policy: dpo.PreferencePairs(policy, None, jnp.ones((3, 2)))
  settings = dpo.Settings(loss='orpo', beta=BETA, orpo_lambda=LAMBDA)
  loss = lambda policy: dpo.preference_loss(pairs(policy), settings)['loss']
  assert np.isfinite(loss(policy))
  assert np.isfinite(jax.grad(loss)(policy)).all()


class _CountingModel:
  """A stand-in model: logits from a [V, V] table by the current token. Records the params
  of each application."""

  def __init__(self):
    self.applied_to = []

  def apply(self, variables, tokens_bt, segment_ids_bt, positions_bt):
    del segment_ids_bt, positions_bt
    self.applied_to.append(variables['params'])
    return variables['params']['table'][tokens_bt]


def preference_batch():
  """Two pairs of 6-token rows, the last three tokens the response."""
  tokens = np.random.default_rng(0).integers(0, 8, size=(2, 2, 6))
  return {'tokens': jnp.asarray(tokens, jnp.int32),
          'segment_ids': jnp.ones((2, 2, 6), jnp.int32),
          'positions': jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 2, 6)),
          'loss_mask': jnp.asarray(np.tile([0, 0, 0, 1, 1, 1], (2, 2, 1)), jnp.int32)}


@pytest.mark.parametrize('loss', sorted(dpo.DPO_LOSSES))
def test_only_losses_that_read_a_reference_run_the_reference_model(loss):
  train_config = default.get_config().train
  train_config.update(objective='dpo')
  train_config.dpo.loss = loss
  objective = objectives.OBJECTIVES['dpo']
  needs_reference = objective.needs_reference(train_config)
  assert needs_reference == (loss not in ('simpo', 'orpo'))
  model = _CountingModel()
  policy = {'table': jax.random.normal(jax.random.key(0), (8, 8))}
  reference = {'table': jnp.zeros((8, 8))} if needs_reference else None
  total, sums, count = objective.loss(policy, preference_batch(), reference, model=model,
                                      settings=objective.settings(train_config))
  assert [params is policy for params in model.applied_to] == (
      [True, False] if needs_reference else [True])
  assert np.isfinite(total) and count == 2 and np.isfinite(sums['chosen_nll'])


def test_the_objectives_say_which_need_a_reference():
  train_config = default.get_config().train
  assert train_config.dpo.loss == 'sigmoid' and train_config.dpo.label_smoothing == 0
  assert objectives.OBJECTIVES['dpo'].needs_reference(train_config)  # Today's DPO.
  assert objectives.OBJECTIVES['grpo'].needs_reference(train_config)
  assert not objectives.OBJECTIVES['sft'].needs_reference(train_config)
  assert not objectives.OBJECTIVES['pretrain'].needs_reference(train_config)


@pytest.mark.parametrize('field, value, message', [
    ('loss', 'kto', r"config.train.dpo.loss='kto' is not one of \['hinge', 'ipo',"),
    ('label_smoothing', 0.5, r'config.train.dpo.label_smoothing=0.5 must be .* < 0.5'),
    ('label_smoothing', -0.1, r'config.train.dpo.label_smoothing=-0.1 must be .* >= 0'),
    ('simpo_gamma', float('nan'), r'config.train.dpo.simpo_gamma=nan must be'),
    ('orpo_lambda', -1.0, r'config.train.dpo.orpo_lambda=-1.0 must be'),
])
def test_bad_dpo_family_fields_are_refused_by_name(field, value, message):
  config = dpo_config.get_config('tiny')
  config.train.dpo[field] = value
  with pytest.raises(ConfigError, match=message):
    objectives.OBJECTIVES['dpo'].validate(config)


def test_label_smoothing_is_refused_where_the_loss_does_not_read_it():
  config = dpo_config.get_config('tiny')
  config.train.dpo.update(loss='robust', label_smoothing=0.1)
  objectives.OBJECTIVES['dpo'].validate(config)
  config.train.dpo.loss = 'ipo'
  with pytest.raises(ConfigError, match=r"dpo.label_smoothing=0.1 is read by config.train"
                                        r".dpo.loss \['sigmoid', 'robust'\] only, not 'ipo'"):
    objectives.OBJECTIVES['dpo'].validate(config)
