"""Losses as small pure functions, shared by every objective.

They return sums, not means, with the token count beside them, so gradient
accumulation and data parallelism divide once by the true number of tokens and
match one big batch exactly.
"""

import jax
import jax.numpy as jnp


def next_token_targets(batch):
  """Targets are the next token of the same document; the last position, padding and
  the first token of the next packed document carry weight 0. With a `loss_mask`
  (post-training: 1 on response tokens) only the masked tokens are targets."""
  tokens_bt, segment_ids_bt = batch['tokens'], batch['segment_ids']
  shift = lambda x_bt: jnp.pad(x_bt[:, 1:], ((0, 0), (0, 1)))
  targets_bt = shift(tokens_bt)
  weights_bt = (shift(segment_ids_bt) == segment_ids_bt) & (segment_ids_bt != 0)
  if 'loss_mask' in batch:
    weights_bt &= shift(batch['loss_mask']) != 0
  return targets_bt, weights_bt.astype(jnp.float32)


def cross_entropy(logits_btv, targets_bt, weights_bt):
  """Summed token cross-entropy and summed z-loss term log(Z)^2 (PaLM, sec. 5).

  Returns (loss_sum, z_loss_sum, num_tokens) as float32 scalars.
  """
  logits_btv = logits_btv.astype(jnp.float32)
  log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logits_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  loss_sum = jnp.sum((log_z_bt - target_logits_bt) * weights_bt)
  z_loss_sum = jnp.sum(jnp.square(log_z_bt) * weights_bt)
  return loss_sum, z_loss_sum, jnp.sum(weights_bt)


def token_log_probs(logits_btv, targets_bt):
  """log p(target) at every position, float32 [B, T]."""
  log_probs_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs_btv, targets_bt[..., None], axis=-1)[..., 0]


def sequence_log_probs(logits_btv, targets_bt, weights_bt):
  """Each row's summed log-probability of its weighted targets, float32 [B]."""
  return jnp.sum(token_log_probs(logits_btv, targets_bt) * weights_bt, axis=-1)


def dpo(policy_chosen_b, policy_rejected_b, reference_chosen_b, reference_rejected_b,
        chosen_lengths_b, *, beta: float, nll_weight: float = 0.0):
  """Direct Preference Optimization (Rafailov et al. 2023, eq. 7) on sequence log-probs.

  The implicit reward of a response is beta * log(pi / pi_ref); the loss is
  -log sigmoid(reward_chosen - reward_rejected), plus `nll_weight` times the chosen
  response's negative log-likelihood per token (RPO, Pang et al. 2024), which
  keeps DPO from lowering the chosen responses along with the rejected ones. Returns
  sums over the pairs: loss, reward accuracy and margin, each side's reward, the chosen
  NLL. (The data pipeline has already dropped pairs with a response truncated away.)
  """
  chosen_b = beta * (policy_chosen_b - reference_chosen_b)
  rejected_b = beta * (policy_rejected_b - reference_rejected_b)
  margin_b = chosen_b - rejected_b
  chosen_nll_b = -policy_chosen_b / chosen_lengths_b
  sums = {
      'loss': -jax.nn.log_sigmoid(margin_b) + nll_weight * chosen_nll_b,
      'reward_accuracy': (margin_b > 0).astype(jnp.float32),
      'reward_margin': margin_b,
      'chosen_reward': chosen_b,
      'rejected_reward': rejected_b,
      'chosen_nll': chosen_nll_b,
  }
  return {name: jnp.sum(value) for name, value in sums.items()}


def grpo(log_probs_bt, old_log_probs_bt, reference_log_probs_bt, advantages_bt, weights_bt,
         *, kl_weight: float, clip_epsilon: float):
  """GRPO's objective (Shao et al. 2024, eq. 3) on the log-probs of sampled completion
  tokens. Summed over tokens, for a mean over all of a batch's completion tokens rather
  than per completion (as DAPO, Yu et al. 2025), so a long completion's tokens weigh as
  much as a short one's.

  The policy-gradient term is PPO's clipped surrogate -min(ratio A, clip(ratio) A), where
  ratio = pi / pi_old and pi_old is the policy that sampled: once the policy has moved
  more than `clip_epsilon` from it on a token, in the direction its advantage A asks,
  that token stops pulling. With one update per rollout, pi_old is pi itself
  (`old_log_probs_bt` = stop_gradient(log_probs_bt)): the ratio is 1, the clip never
  acts, and the gradient is A times that of log pi. The KL penalty to the reference is
  the unbiased, non-negative estimator exp(r) - r - 1 with r = log(pi_ref / pi)
  (Schulman 2020). Returns sums over the weighted tokens: loss, kl and clipped (the
  tokens the clip holds).
  """
  ratio_bt = jnp.exp(log_probs_bt - old_log_probs_bt)
  unclipped_bt = ratio_bt * advantages_bt
  clipped_bt = jnp.clip(ratio_bt, 1 - clip_epsilon, 1 + clip_epsilon) * advantages_bt
  log_ratio_bt = reference_log_probs_bt - log_probs_bt
  kl_bt = jnp.expm1(log_ratio_bt) - log_ratio_bt  # exp(r) - 1 - r, accurate near r = 0.
  loss_bt = -jnp.minimum(unclipped_bt, clipped_bt) + kl_weight * kl_bt
  return {'loss': jnp.sum(loss_bt * weights_bt), 'kl': jnp.sum(kl_bt * weights_bt),
          'clipped': jnp.sum((clipped_bt < unclipped_bt) * weights_bt)}
