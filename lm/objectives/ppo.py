"""PPO (Schulman et al. 2017) on a language model's completions, as InstructGPT (Ouyang
et al. 2022) and TRL's PPO trainer run it: the formulas, each on per-token arrays [B, T]
indexed by the position that predicts a completion token (`mask_bt`, the weights of
lm.losses.next_token_targets), so that position t's value V_t is the state's before
that token is written.

- The reward of a completion arrives at its last token: the score (a rule or a reward
  model, less `missing_eos_penalty` if it ran out of tokens without eos), and at every
  token -kl_weight times an estimate of KL(pi || pi_ref) (`kl_estimate`).
- Generalised advantage estimation (Schulman et al. 2016), `gae`: a reverse scan over
  time; the returns the critic regresses onto are advantages + values.
- Advantages are whitened over the batch's completion tokens (`whiten`).
- The losses: PPO's clipped surrogate with separate low and high clip ranges
  (lm/objectives/grpo.clipped_policy_loss), the clipped value loss `value_loss`, and an
  entropy bonus (`entropy`).
"""

import jax
import jax.numpy as jnp

# The per-token estimators of KL(pi || pi_ref) on tokens sampled from pi (Schulman 2020).
KL_ESTIMATORS = ('k1', 'k3')


def kl_estimate(log_probs_bt, reference_log_probs_bt, estimator: str):
  """k1 = log pi - log pi_ref (unbiased, of either sign), or k3 = exp(r) - r - 1 with
  r = log pi_ref - log pi (unbiased and never negative), per token."""
  if estimator == 'k1':
    return log_probs_bt - reference_log_probs_bt
  log_ratio_bt = reference_log_probs_bt - log_probs_bt
  return jnp.expm1(log_ratio_bt) - log_ratio_bt  # exp(r) - 1 - r, accurate near r = 0.


def last_positions(mask_bt):
  """Each row's last masked position, [B] (0 for a row with none)."""
  positions_bt = jnp.arange(mask_bt.shape[1])[None, :]
  return jnp.max(jnp.where(mask_bt > 0, positions_bt, 0), axis=1)


def token_rewards(scores_b, kl_bt, mask_bt, kl_weight: float):
  """r_t = -kl_weight kl_t on each completion token, plus the completion's score on its
  last, [B, T] (0 off the completion)."""
  last_bt = jax.nn.one_hot(last_positions(mask_bt), mask_bt.shape[1], dtype=jnp.float32)
  return (-kl_weight * kl_bt + scores_b[:, None] * last_bt) * mask_bt


def gae(rewards_bt, values_bt, mask_bt, gamma: float, lam: float):
  """(advantages, returns) [B, T]: A_t = delta_t + gamma lam A_{t+1}, delta_t = r_t +
  gamma V_{t+1} - V_t, with V and A past a completion's last token 0; returns A + V.
  Both are 0 off the completion (mask 0)."""
  def step(carry, inputs):
    next_value_b, next_advantage_b = carry
    reward_b, value_b, mask_b = inputs
    delta_b = reward_b + gamma * next_value_b - value_b
    advantage_b = delta_b + gamma * lam * next_advantage_b
    # Off the completion the scan restarts, so a row's last token sees V = A = 0 after it.
    carry = (value_b * mask_b, advantage_b * mask_b)
    return carry, advantage_b * mask_b

  zeros_b = jnp.zeros(rewards_bt.shape[0], jnp.float32)
  time_major = [x.T.astype(jnp.float32) for x in (rewards_bt, values_bt, mask_bt)]
  _, advantages_tb = jax.lax.scan(step, (zeros_b, zeros_b), time_major, reverse=True)
  advantages_bt = advantages_tb.T
  return advantages_bt, (advantages_bt + values_bt) * mask_bt


def whiten(x_bt, mask_bt, epsilon: float = 1e-8):
  """(x - mean) / std over the masked entries of the whole batch (0 elsewhere)."""
  count = jnp.maximum(jnp.sum(mask_bt), 1.0)
  mean = jnp.sum(x_bt * mask_bt) / count
  variance = jnp.sum(jnp.square(x_bt - mean) * mask_bt) / count
  return (x_bt - mean) * jax.lax.rsqrt(variance + epsilon) * mask_bt


def value_loss(values_bt, old_values_bt, returns_bt, clip: float):
  """PPO's clipped value loss per token, 0.5 max((V - R)^2, (V_clip - R)^2), V_clip the
  old value moved by at most `clip`; and whether the clipped term is the larger."""
  clipped_bt = old_values_bt + jnp.clip(values_bt - old_values_bt, -clip, clip)
  unclipped_loss_bt = jnp.square(values_bt - returns_bt)
  clipped_loss_bt = jnp.square(clipped_bt - returns_bt)
  return 0.5 * jnp.maximum(unclipped_loss_bt, clipped_loss_bt), clipped_loss_bt > unclipped_loss_bt


def entropy(logits_btv):
  """The entropy of each position's next-token distribution, float32 [B, T]."""
  log_probs_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(log_probs_btv) * log_probs_btv, axis=-1)
