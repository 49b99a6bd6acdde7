"""PPO's pieces (lm/objectives/ppo.py) against their formulas written out here: GAE
against a direct loop over each completion, the token rewards, the KL estimators, the
clipped value loss and its gradient, whitening and entropy, on random inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.objectives import ppo

B, T = 4, 12


def completion_mask(rng):
  """Rows whose completion tokens are one span each (prompt before, padding after);
  one row with a single token."""
  mask = np.zeros((B, T), np.float32)
  for row in range(B):
    start = rng.integers(1, 5)
    end = start + 1 if row == 0 else rng.integers(start + 2, T + 1)
    mask[row, start:end] = 1
  return mask


def gae_by_loop(rewards, values, mask, gamma, lam):
  """Schulman et al. 2016, eq. 16, over each completion's tokens, walking back from its
  last token (whose next value is 0)."""
  advantages = np.zeros_like(rewards)
  for row in range(B):
    span = np.flatnonzero(mask[row])
    next_value = next_advantage = 0.0
    for t in span[::-1]:
      delta = rewards[row, t] + gamma * next_value - values[row, t]
      next_advantage = delta + gamma * lam * next_advantage
      advantages[row, t], next_value = next_advantage, values[row, t]
  return advantages, (advantages + values) * mask


@pytest.mark.parametrize('gamma, lam', [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_equals_a_loop_over_each_completion(gamma, lam):
  rng = np.random.default_rng(0)
  mask = completion_mask(rng)
  rewards, values = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(2))
  advantages, returns = jax.jit(ppo.gae, static_argnums=(3, 4))(
      rewards * mask, values, mask, gamma, lam)
  want_advantages, want_returns = gae_by_loop(rewards * mask, values, mask, gamma, lam)
  np.testing.assert_allclose(advantages, want_advantages, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(returns, want_returns, rtol=1e-5, atol=1e-6)
  assert not np.any(advantages[mask == 0])


def test_the_score_arrives_at_the_last_token_and_the_kl_penalty_at_every_one():
  rng = np.random.default_rng(1)
  mask = completion_mask(rng)
  kl = rng.normal(size=(B, T)).astype(np.float32)
  scores = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  rewards = np.asarray(ppo.token_rewards(scores, kl, mask, kl_weight=0.2))
  for row in range(B):
    span = np.flatnonzero(mask[row])
    want = np.zeros(T, np.float32)
    want[span] = -0.2 * kl[row, span]
    want[span[-1]] += scores[row]
    np.testing.assert_allclose(rewards[row], want, rtol=1e-6, atol=1e-7)


def test_the_kl_estimators_are_k1_and_k3():
  log_p = np.array([-1.0, -2.5, -0.1], np.float32)
  log_ref = np.array([-1.5, -2.0, -0.1], np.float32)
  np.testing.assert_allclose(ppo.kl_estimate(log_p, log_ref, 'k1'), log_p - log_ref)
  r = log_ref.astype(np.float64) - log_p
  np.testing.assert_allclose(ppo.kl_estimate(log_p, log_ref, 'k3'), np.exp(r) - r - 1,
                             rtol=1e-6, atol=1e-8)
  # On samples from pi both estimate KL(pi || pi_ref); k3 is never negative.
  logits, ref_logits = jax.random.normal(jax.random.key(0), (2, 6))
  samples = jax.random.categorical(jax.random.key(1), logits, shape=(200_000,))
  log_pi, log_pr = jax.nn.log_softmax(logits), jax.nn.log_softmax(ref_logits)
  exact = float(jnp.sum(jnp.exp(log_pi) * (log_pi - log_pr)))
  for estimator in ppo.KL_ESTIMATORS:
    estimates = ppo.kl_estimate(log_pi[samples], log_pr[samples], estimator)
    assert abs(float(estimates.mean()) - exact) < 0.02 * max(exact, 0.1)
  assert float(ppo.kl_estimate(log_pi[samples], log_pr[samples], 'k3').min()) >= 0


def test_the_value_loss_and_its_gradient_are_ppos_clipped_regression():
  values = np.array([1.0, 0.5, -0.2, 2.0], np.float32)
  old = np.array([0.5, 0.6, 0.3, 1.0], np.float32)
  returns = np.array([2.0, 0.0, -1.0, 1.1], np.float32)
  clip = 0.2
  loss, clipped = ppo.value_loss(values, old, returns, clip)
  want, grads, want_clipped = [], [], []
  for v, o, r in zip(values.astype(np.float64), old, returns):
    v_clip = o + min(max(v - o, -clip), clip)
    want.append(0.5 * max((v - r) ** 2, (v_clip - r) ** 2))
    want_clipped.append((v_clip - r) ** 2 > (v - r) ** 2)
    # The clipped term carries no gradient once V has moved past the clip.
    grads.append((v_clip - r) * (abs(v - o) < clip) if (v_clip - r) ** 2 > (v - r) ** 2
                 else v - r)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  # Rows 0 and 2 moved past the clip away from their return: the clipped term binds.
  np.testing.assert_array_equal(clipped, want_clipped)
  assert want_clipped == [True, False, True, False]
  grad = jax.grad(lambda v: jnp.sum(ppo.value_loss(v, old, returns, clip)[0]))(values)
  np.testing.assert_allclose(grad, grads, rtol=1e-6, atol=1e-7)


def test_whitening_and_entropy():
  rng = np.random.default_rng(2)
  mask = completion_mask(rng)
  x = rng.normal(3.0, 2.0, size=(B, T)).astype(np.float32)
  white = np.asarray(ppo.whiten(x, mask))
  kept = x[mask > 0].astype(np.float64)
  np.testing.assert_allclose(white[mask > 0], (kept - kept.mean()) / kept.std(), rtol=1e-4,
                             atol=1e-5)
  assert not np.any(white[mask == 0])
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(ppo.entropy(logits), -(p * np.log(p)).sum(-1), rtol=1e-5)
  assert math.isclose(float(ppo.entropy(np.zeros((1, 1, 8)))[0, 0]), math.log(8), rel_tol=1e-6)


def test_each_pass_over_a_rollout_trains_on_every_row_once_in_its_own_order():
  settings = ppo.Settings(epochs=3, minibatches=4)
  rows = 8
  batch = {'tokens': np.arange(rows)[:, None] * np.ones((1, 5), np.int32),
           'order': np.asarray(jax.random.uniform(jax.random.key(0), (rows, 3)))}
  objective = ppo.PPO()
  passes = []
  for step in range(2 * settings.epochs * settings.minibatches):  # Two rollouts' steps.
    part = objective.update_batch(batch, jnp.asarray(step), settings)
    assert 'order' not in part and part['tokens'].shape == (rows // 4, 5)
    if step % settings.minibatches == 0:
      passes.append([])
    passes[-1] += list(np.asarray(part['tokens'][:, 0]))
  assert all(sorted(rows_seen) == list(range(rows)) for rows_seen in passes)
  assert len({tuple(p) for p in passes[:3]}) == 3  # Each epoch its own order...
  assert passes[3:] == passes[:3]  # ...the same for the same step of a rollout.
