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
  (lm/objectives/grpo.clipped_surrogate), the clipped value loss `value_loss`, and an
  entropy bonus (`entropy`), averaged over completion tokens.

The objective (`PPO`, config.train.ppo): the prompts, sampler and rewards are GRPO's
(one completion per prompt); the critic (`critic`) is a value head on the policy's trunk
(config.model.head 'lm_value', a fresh head beside the init_from model's) or a value
model of the policy's shapes ('lm_critic', from a reward model or the policy's trunk,
under a fresh head). A rollout's
values, log-probs, the reference's log-probs, rewards and advantages are computed once,
on device, when it is sampled; it then serves `epochs` passes of `minibatches`
mini-batches, each an optimizer step, in an order drawn from the rollout's key, so a
checkpoint falls between rollouts and a resumed run repeats nothing.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import losses, models, sharding
from lm.errors import check, check_number
from lm.models import decoder
from lm.objectives import grpo, rewards

# The per-token estimators of KL(pi || pi_ref) on tokens sampled from pi (Schulman 2020).
KL_ESTIMATORS = ('k1', 'k3')
# config.train.ppo.critic -> the model's head (lm/models/decoder.py).
CRITICS = {'head': 'lm_value', 'model': 'lm_critic'}


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


class Settings(NamedTuple):
  """config.train.ppo, with its defaults (`default_config`): TRL's PPO trainer's where it
  has one."""
  reward: str = 'python_function'  # As config.train.grpo.reward: rules, 'model:<workdir>'.
  max_new_tokens: int = 64
  temperature: float = 1.0
  kl_weight: float = 0.05  # The per-token KL penalty folded into the rewards.
  kl_estimator: str = 'k1'  # 'k1' | 'k3' (KL_ESTIMATORS).
  gamma: float = 1.0
  lam: float = 0.95  # GAE's lambda.
  clip_epsilon: float = 0.2
  clip_epsilon_high: float = 0.0  # The upper side, 1 + high; 0: as clip_epsilon.
  value_clip: float = 0.2
  value_weight: float = 0.1  # The value loss's weight beside the policy's.
  entropy_weight: float = 0.0  # > 0: an entropy bonus.
  epochs: int = 4  # Passes over each rollout.
  minibatches: int = 1  # Optimizer steps per pass; each takes batch_size / minibatches.
  # Subtracted from the score of a completion that hit max_new_tokens without eos.
  missing_eos_penalty: float = 0.0
  whiten_advantages: bool = True
  # The critic: 'head', a value head on the policy's trunk; 'model', a value model of the
  # policy's shapes (twice the parameters), starting from `critic_init` (a reward
  # model's workdir, as InstructGPT's), or if '' from the policy's own trunk.
  critic: str = 'head'
  critic_init: str = ''


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(Settings()._asdict())


def _log_probs_and_values(params, batch, model, temperature: float):
  """(log-probs [B, T] of each next token at `temperature`, values [B, T], logits)."""
  targets_bt, _ = losses.next_token_targets(batch)
  logits_btv, values_bt = decoder.values(model, params, batch['tokens'], batch['segment_ids'],
                                         batch['positions'])
  logits_btv = logits_btv / temperature
  return losses.token_log_probs(logits_btv, targets_bt), values_bt, logits_btv


def prepare(params, reference_params, batch, key, *, model, policy_model, settings,
            num_microbatches: int = 1):
  """A sampled batch (rows, 'scores' and 'finished' [B]) -> the rollout's training batch
  (rows, 'old_log_probs', 'old_values', 'advantages', 'returns' [B, T] and 'order' [B,
  epochs], each pass's order of the rows) and its metrics (means over rows). The
  reference runs as `policy_model` (its logits alone); the forward passes go
  `num_microbatches` rows-parts at a time, as the train step's (whole-batch logits may
  not fit)."""
  rows = {name: batch[name] for name in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
  _, mask_bt = losses.next_token_targets(rows)

  def per_token(part):
    log_probs_bt, values_bt, _ = _log_probs_and_values(params, part, model,
                                                       settings.temperature)
    targets_bt, _ = losses.next_token_targets(part)
    reference_logits_btv = policy_model.apply({'params': reference_params}, part['tokens'],
                                              part['segment_ids'], part['positions'])
    return log_probs_bt, values_bt, losses.token_log_probs(
        reference_logits_btv / settings.temperature, targets_bt)

  old_log_probs_bt, values_bt, reference_log_probs_bt = (
      x.reshape(mask_bt.shape)
      for x in jax.lax.map(per_token, losses.microbatches(rows, num_microbatches)))
  kl_bt = kl_estimate(old_log_probs_bt, reference_log_probs_bt, settings.kl_estimator) * mask_bt
  scores_b = batch['scores'] - settings.missing_eos_penalty * (1 - batch['finished'])
  rewards_bt = token_rewards(scores_b, kl_bt, mask_bt, settings.kl_weight)
  values_bt = values_bt * mask_bt
  advantages_bt, returns_bt = gae(rewards_bt, values_bt, mask_bt, settings.gamma,
                                  settings.lam)
  if settings.whiten_advantages:
    advantages_bt = whiten(advantages_bt, mask_bt)
  out = dict(rows, old_log_probs=old_log_probs_bt, old_values=values_bt,
             advantages=advantages_bt, returns=returns_bt,
             order=jax.random.uniform(key, (mask_bt.shape[0], settings.epochs)))
  kl_b = jnp.sum(kl_bt, axis=1)
  metrics = {'reward': jnp.mean(batch['scores']), 'score': jnp.mean(scores_b),
             'kl': jnp.mean(kl_b), 'non_score_reward': -settings.kl_weight * jnp.mean(kl_b),
             'finished': jnp.mean(batch['finished']),
             'completion_length': jnp.mean(jnp.sum(mask_bt, axis=1)),
             'value': jnp.sum(values_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)}
  return out, metrics


def ppo_loss(params, batch, *, model, settings):
  """PPO's loss on a (mini-)batch of a rollout, as sums over completion tokens: the
  clipped surrogate + value_weight x the clipped value loss - entropy_weight x entropy.
  Returns (loss sum, metric sums, number of completion tokens)."""
  _, mask_bt = losses.next_token_targets(batch)
  log_probs_bt, values_bt, logits_btv = _log_probs_and_values(params, batch, model,
                                                              settings.temperature)
  log_ratio_bt = log_probs_bt - batch['old_log_probs']
  clip_high = settings.clip_epsilon_high or settings.clip_epsilon
  policy_bt, clipped_bt = grpo.clipped_surrogate(log_ratio_bt, batch['advantages'],
                                                 settings.clip_epsilon, clip_high)
  value_bt, value_clipped_bt = value_loss(values_bt, batch['old_values'], batch['returns'],
                                          settings.value_clip)
  entropy_bt = entropy(logits_btv)
  loss_bt = (policy_bt + settings.value_weight * value_bt
             - settings.entropy_weight * entropy_bt)
  total = lambda x_bt: jnp.sum(x_bt * mask_bt)  # pylint: disable=unnecessary-lambda-assignment
  sums = {'loss': total(loss_bt), 'policy_loss': total(policy_bt),
          'value_loss': total(value_bt), 'entropy': total(entropy_bt),
          'clipped': total(clipped_bt), 'value_clipped': total(value_clipped_bt),
          'approx_kl': total(0.5 * jnp.square(log_ratio_bt))}
  return sums['loss'], sums, jnp.sum(mask_bt)


class _Rollouts:
  """Host prompts -> a device batch of the policy's completions, one per prompt, at the
  sampling key of the step (or evaluation batch), prepared for the updates (`prepare`)."""

  def __init__(self, setup, tokenizer, config, reward_models):
    settings = config.train.ppo
    self.sample = grpo.Sampler(
        setup.model, tokenizer, reward=settings.reward, group_size=1,
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
        seq_len=config.data.seq_len, batch_sharding=setup.batch_sharding,
        reward_models=reward_models)
    self.seed, self.batch_sharding = config.seed, setup.batch_sharding
    # The reference's logits need no critic: the model without one reads its params.
    policy_model = models.build(ml_collections.ConfigDict({**config.model.to_dict(),
                                                           'head': 'lm'}))
    self.prepare = jax.jit(
        functools.partial(prepare, model=setup.model, policy_model=policy_model,
                          settings=Settings(**settings),
                          num_microbatches=config.train.grad_accumulation_steps),
        in_shardings=(setup.params_shardings, setup.params_shardings, setup.batch_sharding,
                      None),
        out_shardings=(setup.batch_sharding, sharding.replicated(setup.mesh)))

  def __call__(self, params, prompts: dict, step: int, *, train: bool, more_prompts=None,
               reference_params=None):
    del more_prompts
    key = grpo.rollout_key(self.seed, step, train=train)
    rows, scores_b, finished_b, _ = self.sample(params, prompts, key)
    batch = sharding.global_batch(
        {**rows, 'scores': scores_b, 'finished': finished_b.astype(np.float32)},
        self.batch_sharding)
    batch, metrics = self.prepare(params, reference_params, batch, jax.random.fold_in(key, 1))
    return batch, {name: float(value) for name, value in metrics.items()}


# The float32 [B, T] arrays of a prepared rollout beside the rows.
_ROLLOUT_FIELDS = ('old_log_probs', 'old_values', 'advantages', 'returns')


class PPO(grpo.GRPO):
  """GRPO's prompts and sampler, PPO's critic, advantages and losses."""
  name = 'ppo'

  def default_config(self):
    return default_config()

  def model_head(self, train_config) -> str:
    return CRITICS.get(train_config.ppo.critic, 'lm_value')

  def params_from(self, train_config) -> list[tuple[str, str, str]]:
    ppo = train_config.ppo
    if ppo.critic == 'model' and ppo.critic_init:
      return [('critic', 'config.train.ppo.critic_init', ppo.critic_init)]
    return []

  def settings(self, train_config):
    return Settings(**train_config.ppo)

  def validate(self, config) -> None:
    ppo, name = config.train.ppo, 'config.train.ppo.'
    check(not rewards.unknown(ppo.reward),
          f'config.train.ppo.reward={ppo.reward!r} is not one of {sorted(rewards.REWARDS)}'
          f" or {rewards.MODEL}<a reward model's workdir> (or several joined by '+')")
    check_number(name + 'max_new_tokens', ppo.max_new_tokens, at_least=1,
                 below=config.data.seq_len,
                 why='config.data.seq_len: prompts get the rest of the row')
    check_number(name + 'temperature', ppo.temperature, above=0)
    check_number(name + 'kl_weight', ppo.kl_weight, at_least=0)
    check(ppo.kl_estimator in KL_ESTIMATORS,
          f'{name}kl_estimator={ppo.kl_estimator!r} is not one of {list(KL_ESTIMATORS)}')
    check_number(name + 'gamma', ppo.gamma, at_least=0, at_most=1)
    check_number(name + 'lam', ppo.lam, at_least=0, at_most=1)
    check_number(name + 'clip_epsilon', ppo.clip_epsilon, above=0)
    check_number(name + 'clip_epsilon_high', ppo.clip_epsilon_high, at_least=0,
                 why='0 is clip_epsilon')
    check_number(name + 'value_clip', ppo.value_clip, above=0)
    check_number(name + 'value_weight', ppo.value_weight, at_least=0)
    check_number(name + 'entropy_weight', ppo.entropy_weight, at_least=0)
    check_number(name + 'epochs', ppo.epochs, at_least=1)
    check_number(name + 'minibatches', ppo.minibatches, at_least=1)
    check_number(name + 'missing_eos_penalty', ppo.missing_eos_penalty, at_least=0)
    check(isinstance(ppo.whiten_advantages, bool),
          f'{name}whiten_advantages={ppo.whiten_advantages!r} is not true or false')
    check(ppo.critic in CRITICS, f'{name}critic={ppo.critic!r} is not one of {list(CRITICS)}')
    check(not ppo.critic_init or ppo.critic == 'model',
          f"{name}critic_init={ppo.critic_init!r} starts a critic model: set {name}critic="
          "'model', or leave critic_init empty")
    batch_size, accumulation = config.data.batch_size, config.train.grad_accumulation_steps
    check(batch_size % (ppo.minibatches * accumulation) == 0,
          f'{name}minibatches={ppo.minibatches}: config.data.batch_size={batch_size} must'
          f' split into that many mini-batches of config.train.grad_accumulation_steps='
          f'{accumulation} micro-batches')
    # Checkpoints fall between rollouts, so that a resumed run samples where it stopped.
    every, updates = config.checkpoint.every_steps, self.updates_per_batch(config.train)
    for field, value in (('checkpoint.every_steps', every),
                         ('train.num_steps', config.train.num_steps)):
      check(value % updates == 0, f'config.{field}={value} must be a multiple of epochs x'
            f' minibatches = {updates} (config.train.ppo)')
    check(config.lora.rank == 0, 'config.train.objective="ppo" trains its critic with the'
          ' policy: config.lora.rank must be 0')

  def data_seq_len(self, config) -> int:
    return config.data.seq_len - config.train.ppo.max_new_tokens  # Completions fill the rest.

  def rows_per_example(self, train_config) -> float:
    return 1 / train_config.ppo.minibatches  # A step trains on one mini-batch.

  def batch_shapes(self, config) -> dict:
    """A prepared rollout: one row per prompt."""
    shape = (config.data.batch_size, config.data.seq_len)
    shapes = {name: jax.ShapeDtypeStruct(shape, jnp.int32)
              for name in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
    shapes.update({name: jax.ShapeDtypeStruct(shape, jnp.float32) for name in _ROLLOUT_FIELDS})
    shapes['order'] = jax.ShapeDtypeStruct((shape[0], config.train.ppo.epochs), jnp.float32)
    return shapes

  def update_batch(self, batch, step, settings):
    """Step `step`'s mini-batch: pass (step // minibatches) % epochs over the rollout, in
    that pass's order, its (step % minibatches)-th slice."""
    rows = batch['tokens'].shape[0] // settings.minibatches
    update = step % (settings.epochs * settings.minibatches)
    order = jnp.argsort(jnp.take(batch['order'], update // settings.minibatches, axis=1))
    chosen = jax.lax.dynamic_slice_in_dim(order, (update % settings.minibatches) * rows, rows)
    return {name: jnp.take(value, chosen, axis=0) for name, value in batch.items()
            if name != 'order'}

  def loss(self, params, batch, reference_params, *, model, settings):
    del reference_params  # Its KL is in the rewards (`prepare`).
    return ppo_loss(params, batch, model=model, settings=settings)

  def make_rollout(self, setup, tokenizer, config, models=()):
    return _Rollouts(setup, tokenizer, config, models)

  def updates_per_batch(self, train_config) -> int:
    return train_config.ppo.epochs * train_config.ppo.minibatches
