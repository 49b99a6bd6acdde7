"""Direct preference optimisation (Rafailov et al. 2023) and its family of losses
(config.train.dpo.loss, DPO_LOSSES) on {prompt, chosen, rejected}.

Each example becomes two rows, bos + prompt + chosen + eos and the same with rejected,
each truncated and padded to `seq_len`, with `loss_mask` on the response and eos: a
batch is [B, 2, seq_len]. An example with a response cut away entirely is skipped. The
'stdlib_functions' source rejects each function's body with its lines reversed: the
same tokens in an order that cannot run.
"""

import math
from typing import Callable, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import losses
from lm.data import pipeline
from lm.errors import check, check_number
from lm.objectives import base


class PreferencePairs(NamedTuple):
  """Preference pairs' response log-probs, float32 [B, 2]: column 0 the chosen response,
  1 the rejected. Log-probs are summed over each response's targets (its tokens and eos),
  `lengths_b2` counts them, and `reference_b2` is the frozen reference model's, or None
  for a loss that reads no reference."""
  policy_b2: jax.Array
  reference_b2: jax.Array | None
  lengths_b2: jax.Array


class Settings(NamedTuple):
  """config.train.dpo, with its defaults (`default_config`); each loss reads some."""
  # 'sigmoid' (DPO) | 'robust' (rDPO) | 'ipo' | 'hinge' (SLiC) | 'simpo' | 'orpo'
  # (DPO_LOSSES); SimPO and ORPO need no reference model.
  loss: str = 'sigmoid'
  # DPO's beta: how far from the reference the policy may move; IPO's tau; SimPO's
  # reward scale (its paper uses 2 to 2.5); ORPO does not read it.
  beta: float = 0.1
  nll_weight: float = 0.0  # > 0: plus this x the chosen responses' per-token NLL (RPO).
  # 'sigmoid' (cDPO) and 'robust': the probability that a pair's label is flipped.
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5  # 'simpo': the target reward margin gamma.
  orpo_lambda: float = 0.1  # 'orpo': the weight of the odds-ratio term beside the NLL.


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(Settings()._asdict())


def _chosen_minus_rejected(x_b2):
  return x_b2[:, 0] - x_b2[:, 1]


def _reward_margin(pairs: PreferencePairs, beta: float):
  """beta h, h = log pi/pi_ref (y_w) - log pi/pi_ref (y_l) on summed log-probs: the
  difference of DPO's implicit rewards beta log pi/pi_ref, [B]."""
  return _chosen_minus_rejected(beta * (pairs.policy_b2 - pairs.reference_b2))


def _sigmoid(pairs: PreferencePairs, settings: Settings):
  """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta h). With label smoothing eps,
  conservative DPO (cDPO, Mitchell 2023, eq. 3), the label taken as flipped with
  probability eps: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
  logits_b = _reward_margin(pairs, settings.beta)
  eps = settings.label_smoothing
  if eps == 0:  # DPO's own graph, without a second term times zero.
    return -jax.nn.log_sigmoid(logits_b)
  return -(1 - eps) * jax.nn.log_sigmoid(logits_b) - eps * jax.nn.log_sigmoid(-logits_b)


def _robust(pairs: PreferencePairs, settings: Settings):
  """Robust DPO (Chowdhury et al. 2024), as TRL's loss_type='robust': an unbiased
  estimate of DPO's loss under labels flipped with probability eps,
  [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps). Unlike
  cDPO's, its second term has a plus sign, and the loss can be negative."""
  logits_b = _reward_margin(pairs, settings.beta)
  eps = settings.label_smoothing
  return ((-(1 - eps) * jax.nn.log_sigmoid(logits_b) + eps * jax.nn.log_sigmoid(-logits_b))
          / (1 - 2 * eps))


def _ipo(pairs: PreferencePairs, settings: Settings):
  """IPO (Azar et al. 2023, eq. 17 with tau = beta): (h - 1/(2 beta))^2, a regression of
  the margin onto a target rather than a push without bound. As in TRL and the IPO
  authors' practice, h is of log-probs averaged over each response's tokens."""
  per_token_b2 = (pairs.policy_b2 - pairs.reference_b2) / pairs.lengths_b2
  return jnp.square(_chosen_minus_rejected(per_token_b2) - 1 / (2 * settings.beta))


def _hinge(pairs: PreferencePairs, settings: Settings):
  """SLiC's hinge (Zhao et al. 2023) on reference-normalised likelihoods (RSO, Liu et al.
  2024), as TRL's loss_type='hinge': relu(1 - beta h)."""
  return jax.nn.relu(1 - _reward_margin(pairs, settings.beta))


def _simpo(pairs: PreferencePairs, settings: Settings):
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


def _orpo(pairs: PreferencePairs, settings: Settings):
  """ORPO (Hong et al. 2024, eqs. 6-7), reference-free: the chosen response's NLL per
  token plus lambda -log sigmoid(log odds(y_w) - log odds(y_l))."""
  chosen_nll_b = -pairs.policy_b2[:, 0] / pairs.lengths_b2[:, 0]
  odds_ratio_b = -jax.nn.log_sigmoid(_chosen_minus_rejected(orpo_log_odds(pairs)))
  return chosen_nll_b + settings.orpo_lambda * odds_ratio_b


class PreferenceLoss(NamedTuple):
  pair_loss: Callable  # (PreferencePairs, Settings) -> per-pair loss [B].
  needs_reference: bool  # Whether it reads the reference's log-probs.
  uses_label_smoothing: bool = False
  metrics: Callable | None = None  # PreferencePairs -> {name: [B]} of its own.


# config.train.dpo.loss -> its loss.
DPO_LOSSES = {
    'sigmoid': PreferenceLoss(_sigmoid, needs_reference=True, uses_label_smoothing=True),
    'robust': PreferenceLoss(_robust, needs_reference=True, uses_label_smoothing=True),
    'ipo': PreferenceLoss(_ipo, needs_reference=True),
    'hinge': PreferenceLoss(_hinge, needs_reference=True),
    'simpo': PreferenceLoss(_simpo, needs_reference=False),
    'orpo': PreferenceLoss(_orpo, needs_reference=False, metrics=lambda pairs: {
        'log_odds_ratio': _chosen_minus_rejected(orpo_log_odds(pairs))}),
}


def preference_loss(pairs: PreferencePairs, settings: Settings):
  """Direct Preference Optimization (Rafailov et al. 2023) and its family,
  DPO_LOSSES[settings.loss], plus `settings.nll_weight` times the chosen response's negative log-likelihood per token (RPO,
  Pang et al. 2024), which keeps DPO from lowering the chosen responses along with the
  rejected ones. Returns sums over the pairs: the loss, the chosen NLL and

  - with a reference: each side's implicit reward beta log(pi / pi_ref) on summed
    log-probs (DPO's, whatever the loss), their margin and its accuracy (margin > 0);
  - without (SimPO, ORPO): each side's mean log-prob per token, their margin and its
    accuracy (the chosen response the likelier per token); ORPO adds its log odds ratio.

  (The data pipeline has already dropped pairs with a response truncated away.)
  """
  chosen_nll_b = -pairs.policy_b2[:, 0] / pairs.lengths_b2[:, 0]
  family_loss = DPO_LOSSES[settings.loss]
  sums = {'loss': family_loss.pair_loss(pairs, settings) + settings.nll_weight * chosen_nll_b}
  if family_loss.needs_reference:
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
  if family_loss.metrics:
    sums.update(family_loss.metrics(pairs))
  sums['chosen_nll'] = chosen_nll_b
  return {name: jnp.sum(value) for name, value in sums.items()}




class TokenizePair(grain.transforms.Map):
  """An example -> [2, seq_len] arrays: row 0 the chosen response, row 1 the rejected."""

  def __init__(self, tokenizer, seq_len: int, counts=None):
    self.tokenizer, self.seq_len, self.counts = tokenizer, seq_len, counts

  def map(self, example: dict) -> dict:
    rows = {name: np.zeros((2, self.seq_len), np.int32)
            for name in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
    cut = False
    for row, response in enumerate((example['chosen'], example['rejected'])):
      tokens, loss_mask = pipeline.prompt_and_response(self.tokenizer, example['prompt'],
                                                       response)
      cut |= len(tokens) > self.seq_len
      tokens, loss_mask = tokens[:self.seq_len], loss_mask[:self.seq_len]
      length = len(tokens)
      rows['tokens'][row, :length] = tokens
      rows['loss_mask'][row, :length] = loss_mask
      rows['segment_ids'][row, :length] = 1
      rows['positions'][row, :length] = np.arange(length)
    if self.counts is not None:
      self.counts['examples'] += 1
      self.counts['examples_cut'] += cut
    return rows


class DPO(base.Objective):
  name = 'dpo'
  sources = base.POST_TRAINING_SOURCES
  count_name = 'num_pairs'

  def default_config(self):
    return default_config()

  def needs_reference(self, train_config) -> bool:
    """SimPO and ORPO read no reference: none is loaded, kept or run."""
    return DPO_LOSSES[train_config.dpo.loss].needs_reference

  def validate(self, config) -> None:
    dpo, name = config.train.dpo, 'config.train.dpo.'
    check(dpo.loss in DPO_LOSSES,
          f'{name}loss={dpo.loss!r} is not one of {sorted(DPO_LOSSES)}')
    check_number(name + 'beta', dpo.beta, above=0)
    check_number(name + 'nll_weight', dpo.nll_weight, at_least=0)
    check_number(name + 'label_smoothing', dpo.label_smoothing, at_least=0,
                 below=0.5, why='the probability that a label is flipped')
    uses = [loss for loss, value in DPO_LOSSES.items() if value.uses_label_smoothing]
    check(dpo.label_smoothing == 0 or dpo.loss in uses,
          f'{name}label_smoothing={dpo.label_smoothing} is read by'
          f' {name}loss {uses} only, not {dpo.loss!r}; set it to 0')
    check_number(name + 'simpo_gamma', dpo.simpo_gamma, at_least=0)
    check_number(name + 'orpo_lambda', dpo.orpo_lambda, at_least=0)

  def build_source(self, data_config):
    return base.stdlib_or_jsonl_examples(data_config, ('prompt', 'chosen', 'rejected'),
                                         pairs=True)

  def rows(self, dataset, tokenizer, seq_len: int, counts=None):
    """{'tokens', 'segment_ids', 'positions', 'loss_mask'} int32 [2, seq_len]."""
    return pipeline.examples(dataset).map(TokenizePair(tokenizer, seq_len, counts)).filter(
        pipeline.HasTargets(counts))

  def rows_per_example(self, train_config) -> int:
    return 2

  def batch_shapes(self, config) -> dict:
    shape = (config.data.batch_size, 2, config.data.seq_len)
    return {name: jax.ShapeDtypeStruct(shape, jnp.int32)
            for name in ('tokens', 'segment_ids', 'positions', 'loss_mask')}

  def loss(self, params, batch, reference_params, *, model, settings):
    """config.train.dpo.loss (`settings`: config.train.dpo) on [B, 2, T] arrays: each
    pair's chosen (0) and rejected (1) sequence, with the response marked by `loss_mask`. Runs the reference model only for
    a loss that reads it (else `reference_params` is None). Returns (loss sum, metric
    sums, number of pairs)."""
    rows = {name: value.reshape(-1, value.shape[-1]) for name, value in batch.items()}
    targets_bt, weights_bt = losses.next_token_targets(rows)

    def log_probs_b2(params):
      logits_btv = model.apply({'params': params}, rows['tokens'], rows['segment_ids'],
                               rows['positions'])
      return losses.sequence_log_probs(logits_btv, targets_bt, weights_bt).reshape(-1, 2)

    policy_b2 = log_probs_b2(params)
    reference_b2 = (jax.lax.stop_gradient(log_probs_b2(reference_params))
                    if DPO_LOSSES[settings.loss].needs_reference else None)
    pairs = PreferencePairs(policy_b2, reference_b2, jnp.sum(weights_bt, axis=-1).reshape(-1, 2))
    sums = preference_loss(pairs, settings)
    return sums['loss'], sums, jnp.asarray(policy_b2.shape[0], jnp.float32)
