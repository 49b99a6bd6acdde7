"""Losses as small pure functions, shared by every objective.

They return sums, not means, with the token count beside them, so gradient
accumulation and data parallelism divide once by the true number of tokens and
match one big batch exactly.
"""

import math
from typing import Callable, NamedTuple

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


class PreferencePairs(NamedTuple):
  """Preference pairs' response log-probs, float32 [B, 2]: column 0 the chosen response,
  1 the rejected. Log-probs are summed over each response's targets (its tokens and eos),
  `lengths_b2` counts them, and `reference_b2` is the frozen reference model's, or None
  for a loss that reads no reference."""
  policy_b2: jax.Array
  reference_b2: jax.Array | None
  lengths_b2: jax.Array


class PreferenceSettings(NamedTuple):
  """The config.train fields the losses of DPO_LOSSES read (each reads some)."""
  beta: float  # dpo_beta
  label_smoothing: float = 0.0  # dpo_label_smoothing
  simpo_gamma: float = 0.0  # dpo_simpo_gamma
  orpo_lambda: float = 0.0  # dpo_orpo_lambda


def _chosen_minus_rejected(x_b2):
  return x_b2[:, 0] - x_b2[:, 1]


def _reward_margin(pairs: PreferencePairs, beta: float):
  """beta h, h = log pi/pi_ref (y_w) - log pi/pi_ref (y_l) on summed log-probs: the
  difference of DPO's implicit rewards beta log pi/pi_ref, [B]."""
  return _chosen_minus_rejected(beta * (pairs.policy_b2 - pairs.reference_b2))


def _sigmoid(pairs: PreferencePairs, settings: PreferenceSettings):
  """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta h). With label smoothing eps,
  conservative DPO (cDPO, Mitchell 2023, eq. 3), the label taken as flipped with
  probability eps: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
  logits_b = _reward_margin(pairs, settings.beta)
  eps = settings.label_smoothing
  if eps == 0:  # DPO's own graph, without a second term times zero.
    return -jax.nn.log_sigmoid(logits_b)
  return -(1 - eps) * jax.nn.log_sigmoid(logits_b) - eps * jax.nn.log_sigmoid(-logits_b)


def _robust(pairs: PreferencePairs, settings: PreferenceSettings):
  """Robust DPO (Chowdhury et al. 2024), as TRL's loss_type='robust': an unbiased
  estimate of DPO's loss under labels flipped with probability eps,
  [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps). Unlike
  cDPO's, its second term has a plus sign, and the loss can be negative."""
  logits_b = _reward_margin(pairs, settings.beta)
  eps = settings.label_smoothing
  return ((-(1 - eps) * jax.nn.log_sigmoid(logits_b) + eps * jax.nn.log_sigmoid(-logits_b))
          / (1 - 2 * eps))


def _ipo(pairs: PreferencePairs, settings: PreferenceSettings):
  """IPO (Azar et al. 2023, eq. 17 with tau = beta): (h - 1/(2 beta))^2, a regression of
  the margin onto a target rather than a push without bound. As in TRL and the IPO
  authors' practice, h is of log-probs averaged over each response's tokens."""
  per_token_b2 = (pairs.policy_b2 - pairs.reference_b2) / pairs.lengths_b2
  return jnp.square(_chosen_minus_rejected(per_token_b2) - 1 / (2 * settings.beta))


def _hinge(pairs: PreferencePairs, settings: PreferenceSettings):
  """SLiC's hinge (Zhao et al. 2023) on reference-normalised likelihoods (RSO, Liu et al.
  2024), as TRL's loss_type='hinge': relu(1 - beta h)."""
  return jax.nn.relu(1 - _reward_margin(pairs, settings.beta))


def _simpo(pairs: PreferencePairs, settings: PreferenceSettings):
  """SimPO (Meng et al. 2024, eq. 6), reference-free: -log sigmoid(beta/|y_w| log pi(y_w)
  - beta/|y_l| log pi(y_l) - gamma), the length-normalised log-likelihood as the reward
  and gamma a target reward margin."""
  per_token_b2 = pairs.policy_b2 / pairs.lengths_b2
  return -jax.nn.log_sigmoid(settings.beta * _chosen_minus_rejected(per_token_b2)
                             - settings.simpo_gamma)


def _log_one_minus_exp(x):
  """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
  return jnp.where(x > -math.log(2), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_log_odds(pairs: PreferencePairs):
  """ORPO's log odds(y) = log P/(1 - P) with P = exp(mean log pi over y's tokens)
  (Hong et al. 2024, eqs. 3-4), [B, 2]."""
  per_token_b2 = pairs.policy_b2 / pairs.lengths_b2
  # A float32 log-softmax can round to 0 where p ~ 1: keep log(1 - P) finite.
  per_token_b2 = jnp.minimum(per_token_b2, -1e-6)
  return per_token_b2 - _log_one_minus_exp(per_token_b2)


def _orpo(pairs: PreferencePairs, settings: PreferenceSettings):
  """ORPO (Hong et al. 2024, eqs. 6-7), reference-free: the chosen response's NLL per
  token plus lambda -log sigmoid(log odds(y_w) - log odds(y_l))."""
  chosen_nll_b = -pairs.policy_b2[:, 0] / pairs.lengths_b2[:, 0]
  odds_ratio_b = -jax.nn.log_sigmoid(_chosen_minus_rejected(orpo_log_odds(pairs)))
  return chosen_nll_b + settings.orpo_lambda * odds_ratio_b


class PreferenceLoss(NamedTuple):
  pair_loss: Callable  # (PreferencePairs, PreferenceSettings) -> per-pair loss [B].
  needs_reference: bool  # Whether it reads the reference's log-probs.
  uses_label_smoothing: bool = False
  metrics: Callable | None = None  # PreferencePairs -> {name: [B]} of its own.


# config.train.dpo_loss -> its loss.
DPO_LOSSES = {
    'sigmoid': PreferenceLoss(_sigmoid, needs_reference=True, uses_label_smoothing=True),
    'robust': PreferenceLoss(_robust, needs_reference=True, uses_label_smoothing=True),
    'ipo': PreferenceLoss(_ipo, needs_reference=True),
    'hinge': PreferenceLoss(_hinge, needs_reference=True),
    'simpo': PreferenceLoss(_simpo, needs_reference=False),
    'orpo': PreferenceLoss(_orpo, needs_reference=False, metrics=lambda pairs: {
        'log_odds_ratio': _chosen_minus_rejected(orpo_log_odds(pairs))}),
}


def dpo(pairs: PreferencePairs, *, loss: str, settings: PreferenceSettings,
        nll_weight: float = 0.0):
  """Direct Preference Optimization (Rafailov et al. 2023) and its family, DPO_LOSSES[loss],
  plus `nll_weight` times the chosen response's negative log-likelihood per token (RPO,
  Pang et al. 2024), which keeps DPO from lowering the chosen responses along with the
  rejected ones. Returns sums over the pairs: the loss, the chosen NLL and

  - with a reference: each side's implicit reward beta log(pi / pi_ref) on summed
    log-probs (DPO's, whatever the loss), their margin and its accuracy (margin > 0);
  - without (SimPO, ORPO): each side's mean log-prob per token, their margin and its
    accuracy (the chosen response the likelier per token); ORPO adds its log odds ratio.

  (The data pipeline has already dropped pairs with a response truncated away.)
  """
  chosen_nll_b = -pairs.policy_b2[:, 0] / pairs.lengths_b2[:, 0]
  preference_loss = DPO_LOSSES[loss]
  sums = {'loss': preference_loss.pair_loss(pairs, settings) + nll_weight * chosen_nll_b}
  if preference_loss.needs_reference:
    rewards_b2 = settings.beta * (pairs.policy_b2 - pairs.reference_b2)
    margin_b = _chosen_minus_rejected(rewards_b2)
    sums.update(reward_accuracy=(margin_b > 0).astype(jnp.float32), reward_margin=margin_b,
                chosen_reward=rewards_b2[:, 0], rejected_reward=rewards_b2[:, 1])
  else:
    per_token_b2 = pairs.policy_b2 / pairs.lengths_b2
    margin_b = _chosen_minus_rejected(per_token_b2)
    sums.update(log_prob_accuracy=(margin_b > 0).astype(jnp.float32),
                log_prob_margin=margin_b, chosen_log_prob=per_token_b2[:, 0],
                rejected_log_prob=per_token_b2[:, 1])
  if preference_loss.metrics:
    sums.update(preference_loss.metrics(pairs))
  sums['chosen_nll'] = chosen_nll_b
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
