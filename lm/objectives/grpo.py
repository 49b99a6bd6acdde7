"""GRPO (Shao et al. 2024): reinforcement learning from a checkable reward on the model's
own samples.

The pipeline gives prompts: each example is kept whole, as JSON text for its reward, with
bos + prompt right-padded to the prompt's budget (`seq_len - max_new_tokens`); longer
prompts are skipped. Each rollout, the current policy completes each prompt
`group_size` times (one sampling call for the whole batch, with the KV cache); each
completion's reward is computed on the host from its text; its advantage is its reward
against its own group's (GRPO, Shao et al. 2024, sec. 4.1.2), so how hard a prompt is
cancels out. The rows are prompt + completion, with `loss_mask` on the completion (eos
included), as SFT's, plus the advantage on every token.

The GRPO family, by config.train.grpo (each a few lines below): the advantage's baseline
(`advantage`: GRPO's group-normalised, RLOO's leave-one-out, Dr. GRPO's unscaled), how
token losses are averaged (`aggregation`: DAPO's token mean, GRPO's per-sequence mean, Dr.
GRPO's constant divisor), clip-higher (`clip_epsilon_high`, DAPO), dynamic sampling
(`dynamic_sampling_rounds`, DAPO) and GSPO's sequence-level ratio (`ratio`).
"""

import functools
import json

from typing import NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import chat, distributed, losses, sampling, sharding
from lm.engine import engine
from lm.data import pipeline
from lm.errors import check, check_number
from lm.objectives import base, reward_model, rewards

# Keeps the advantages of a group whose rewards are all equal at 0, not 0/0.
_STD_EPSILON = 1e-6


# A completion's advantage from its group's rewards r (G of them), by `advantage`.
ADVANTAGES = {
    # (r - mean) / std: GRPO (Shao et al. 2024).
    'grpo': lambda centred, groups: centred / (groups.std(axis=1, keepdims=True)
                                               + _STD_EPSILON),
    # r - the mean of the other G - 1: RLOO (Ahmadian et al. 2024), G / (G - 1) (r - mean).
    'rloo': lambda centred, groups: centred * groups.shape[1] / (groups.shape[1] - 1),
    # r - mean, unscaled: Dr. GRPO (Liu et al. 2025); the std favours too easy or hard groups.
    'dr_grpo': lambda centred, groups: centred,
}
# What the summed token losses are divided by, by `aggregation` (the step divides once).
AGGREGATIONS = ('token_mean', 'sequence_mean', 'constant')
RATIOS = ('token', 'sequence')


class Settings(NamedTuple):
  """config.train.grpo, with its defaults (`default_config`)."""
  reward: str = 'python_function'  # By name from lm/objectives/rewards.py; '+' sums.
  group_size: int = 8  # Completions per prompt; data.batch_size counts prompts.
  max_new_tokens: int = 256  # Per completion; the prompt gets the rest of data.seq_len.
  temperature: float = 0.7  # Of the sampling policy, the one that is trained.
  kl_weight: float = 0.04  # Of the per-token KL penalty to the reference.
  updates_per_rollout: int = 1  # Optimizer steps on each rollout (GRPO's mu).
  clip_epsilon: float = 0.2  # PPO's clip on pi / pi_sampler, once updates_per_rollout > 1.
  clip_epsilon_high: float = 0.0  # Its upper side (DAPO's clip-higher: 0.28); 0: as above.
  advantage: str = 'grpo'  # One of ADVANTAGES.
  # 'token_mean': over the batch's completion tokens (DAPO), so a long completion's tokens
  # weigh as much as a short one's; 'sequence_mean': each completion's mean, then over
  # completions (GRPO's paper); 'constant': over completions x max_new_tokens (Dr. GRPO).
  aggregation: str = 'token_mean'
  # 'token': pi / pi_sampler per token; 'sequence': GSPO's (Zheng et al. 2025), the
  # geometric mean over a completion's tokens, clipped as one.
  ratio: str = 'token'
  # DAPO's dynamic sampling: groups whose rewards are all equal (no advantage) are replaced
  # by groups of further prompts, sampled up to this many more times per rollout (0: off).
  dynamic_sampling_rounds: int = 0


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(Settings()._asdict())


def group_advantages(rewards_b: np.ndarray, group_size: int,
                     advantage: str = 'grpo') -> np.ndarray:
  """Each reward against its own group's (ADVANTAGES[advantage]); rows are grouped
  consecutively, `group_size` to a prompt."""
  groups = np.asarray(rewards_b, np.float32).reshape(-1, group_size)
  centred = groups - groups.mean(axis=1, keepdims=True)
  return ADVANTAGES[advantage](centred, groups).reshape(-1)


def informative_groups(rewards_b: np.ndarray, group_size: int) -> np.ndarray:
  """[groups] bool: whether a group's rewards differ, so that it has an advantage."""
  groups = np.asarray(rewards_b).reshape(-1, group_size)
  return groups.max(axis=1) > groups.min(axis=1)


class Sampler:
  """The policy's completions of a batch of prompts, `group_size` each, in one cached
  sampling call, with their rewards: GRPO's and PPO's rollouts."""

  def __init__(self, model, tokenizer, *, reward: str, group_size: int, max_new_tokens: int,
               temperature: float, seq_len: int, batch_sharding=None, reward_models=()):
    self.model, self.tokenizer, self.seq_len = model, tokenizer, seq_len
    # With it, each process samples and rewards its own prompts' rows of a global batch.
    self.batch_sharding = batch_sharding
    self.reward = rewards.get(reward)
    self.has_rules = any(not part.startswith(rewards.MODEL) for part in reward.split('+'))
    # (model, params) of each 'model:' part of the reward, restored.
    self.scorers = [reward_model.Scorer(scorer_model, params, batch_sharding)
                    for scorer_model, params in reward_models]
    self.group_size, self.max_new_tokens = group_size, max_new_tokens
    self.temperature = temperature
    # eos, and a chat template's end of turn (the prompts may be conversations).
    self.stop_ids = chat.end_of_turn_ids(tokenizer)

  def __call__(self, params, prompts: dict, rng):
    """(rows: tokens, segment_ids, positions and loss_mask [B * group_size, seq_len],
    rewards, whether each finished, and their numbers of new tokens)."""
    prompt_tokens_bt = np.repeat(prompts['prompt_tokens'], self.group_size, axis=0)
    prompt_lengths_b = np.repeat(prompts['prompt_length'], self.group_size)
    rows, completions = complete_prompts(
        self.model, params, prompt_tokens_bt, prompt_lengths_b, rng, self.stop_ids,
        max_new_tokens=self.max_new_tokens, seq_len=self.seq_len,
        temperature=self.temperature, pad_id=self.tokenizer.pad_id,
        batch_sharding=self.batch_sharding)
    examples = [json.loads(str(text)) for text in prompts['example']]
    num_rows = len(prompt_lengths_b)
    rewards_b, finished_b = np.zeros(num_rows, np.float32), np.zeros(num_rows, bool)
    for row, completion in enumerate(completions):
      finished_b[row] = len(completion) > 0 and completion[-1] in self.stop_ids
      text = self.tokenizer.decode(completion[:-1] if finished_b[row] else completion)
      if self.has_rules:
        rewards_b[row] = self.reward(examples[row // self.group_size], text,
                                     bool(finished_b[row]))
    for scorer in self.scorers:  # Every process scores its rows together.
      rewards_b += scorer(rows)
    return rows, rewards_b, finished_b, np.asarray([len(c) for c in completions])


def complete_prompts(model, params, prompt_tokens_bt, prompt_lengths_b, rng, stop_ids, *,
                     max_new_tokens: int, seq_len: int, temperature: float, pad_id: int,
                     batch_sharding=None):
  """The model's completions of right-padded prompts, in one cached sampling call: (rows
  of prompt + completion, [B, seq_len] tokens, segment_ids, positions and loss_mask on
  the completion; each completion's ids, its stop id included when it stopped). On one
  process the engine samples them (continuous batching: no row waits for the longest);
  on several, every process's rows in one static batch. Both draw the same tokens."""
  num_rows = len(prompt_lengths_b)
  if jax.process_count() == 1 and not model.config.get('kv_cache_dtype', ''):
    new = engine.complete_rows(model, params, prompt_tokens_bt, prompt_lengths_b, rng,
                               stop_ids, max_new_tokens=max_new_tokens, max_length=seq_len,
                               temperature=temperature)
    new_bm = np.zeros((num_rows, max_new_tokens), np.int32)
    num_new_b = np.array([len(ids) for ids in new])
    for row, ids in enumerate(new):
      new_bm[row, :len(ids)] = ids
  else:
    new_bm, num_new_b = sampling.generate_rows(
        params, prompt_tokens_bt, prompt_lengths_b, rng, np.asarray(stop_ids, np.int32),
        batch_sharding=batch_sharding, model=model, max_new_tokens=max_new_tokens,
        cache_length=seq_len, temperature=temperature, pad_id=pad_id)
  rows = {name: np.zeros((num_rows, seq_len), np.int32)
          for name in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
  completions = []
  for row in range(num_rows):
    prompt_length, num_new = prompt_lengths_b[row], num_new_b[row]
    completions.append(new_bm[row, :num_new])
    length = prompt_length + num_new
    rows['tokens'][row, :prompt_length] = prompt_tokens_bt[row, :prompt_length]
    rows['tokens'][row, prompt_length:length] = completions[-1]
    rows['segment_ids'][row, :length] = 1
    rows['positions'][row, :length] = np.arange(length)
    rows['loss_mask'][row, prompt_length:length] = 1
  return rows, completions


class Rollouts:
  """Turns a batch of prompts (the 'grpo' pipeline's) into a GRPO training batch."""

  def __init__(self, model, tokenizer, grpo_config, seq_len: int, batch_sharding=None,
               reward_models=()):
    self.sample = Sampler(
        model, tokenizer, reward=grpo_config.reward, group_size=grpo_config.group_size,
        max_new_tokens=grpo_config.max_new_tokens, temperature=grpo_config.temperature,
        seq_len=seq_len, batch_sharding=batch_sharding, reward_models=reward_models)
    self.seq_len, self.group_size = seq_len, grpo_config.group_size
    self.advantage = grpo_config.advantage
    self.dynamic_sampling_rounds = grpo_config.dynamic_sampling_rounds

  def __call__(self, params, prompts: dict, rng, more_prompts=None) -> tuple[dict, dict]:
    """`prompts`: 'example' [B] (each example as JSON text), 'prompt_tokens' [B, T] (bos +
    prompt, right-padded) and 'prompt_length' [B]. Returns the batch, [B * group_size,
    seq_len] arrays with each prompt's group in consecutive rows, and the rollout's
    metrics (means over the rows sampled). With dynamic sampling, `more_prompts()` gives
    the next batch of prompts, for groups that replace those without an advantage."""
    rounds = [self.sample(params, prompts, rng)]
    num_groups = len(prompts['prompt_length'])
    if self.dynamic_sampling_rounds and more_prompts is not None:
      # Every process samples as often as the one with the fewest informative groups: the
      # sampler is a collective over all processes' rows.
      while len(rounds) <= self.dynamic_sampling_rounds and distributed.all_gather(np.array(
          [sum(informative_groups(r[1], self.group_size).sum() for r in rounds)])).min() < (
              num_groups):
        rounds.append(self.sample(params, more_prompts(), jax.random.fold_in(rng, len(rounds))))
    rows = {name: np.concatenate([r[0][name] for r in rounds]) for name in rounds[0][0]}
    rewards_b, finished_b, num_new_b = (np.concatenate([r[i] for r in rounds])
                                        for i in range(1, 4))
    metrics = [rewards_b.mean(), finished_b.mean(), num_new_b.mean()]
    if self.dynamic_sampling_rounds:
      # The groups with an advantage first, in the order sampled; then, if too few, others.
      informative = informative_groups(rewards_b, self.group_size)
      kept = np.concatenate([np.flatnonzero(informative),
                             np.flatnonzero(~informative)])[:num_groups]
      kept_rows = (kept[:, None] * self.group_size + np.arange(self.group_size)).reshape(-1)
      rows = {name: value[kept_rows] for name, value in rows.items()}
      rewards_b = rewards_b[kept_rows]
      metrics += [informative[kept].mean(), len(rounds)]
    batch = dict(rows)
    advantages_b = group_advantages(rewards_b, self.group_size, self.advantage)
    batch['advantages'] = np.repeat(advantages_b[:, None], self.seq_len, axis=1)
    # Means over every process's rows (each has as many).
    means = distributed.all_gather(np.array(metrics, np.float64)).mean(axis=0)
    names = ('reward', 'finished', 'completion_length', 'informative_groups',
             'sampling_rounds')
    return batch, dict(zip(names, map(float, means)))


def rollout_key(seed: int, step: int, *, train: bool):
  """The sampling key of a training step, or of an evaluation batch: fixed by the seed,
  so a resumed run samples what the uninterrupted one would have."""
  return jax.random.fold_in(jax.random.key(seed), 2 * step + (0 if train else 1))


class TokenizePrompt(grain.transforms.Map):
  def __init__(self, tokenizer, seq_len: int):
    self.tokenizer, self.seq_len = tokenizer, seq_len

  def map(self, example: dict) -> dict:
    prompt = example['prompt']
    if isinstance(prompt, str):
      ids = sampling.prompt_ids(self.tokenizer, prompt)
    else:  # A conversation: the model's chat template, up to where the assistant writes.
      ids = list(chat.render(self.tokenizer, prompt, add_generation_prompt=True).ids)
    kept = ids[:self.seq_len]  # A longer prompt is filtered out by its length.
    tokens = np.zeros(self.seq_len, np.int32)
    tokens[:len(kept)] = kept
    # As JSON text: examples' fields may differ, and a batch stacks each key into one array.
    return {'example': json.dumps(example), 'prompt_tokens': tokens,
            'prompt_length': np.int32(len(ids))}


def prompt_fits(example: dict) -> bool:
  return example['prompt_length'] <= len(example['prompt_tokens'])


def _policy_log_probs_bt(params, batch, model, temperature: float):
  """Log-probs [B, T] of each row's next tokens under the model at `temperature`."""
  targets_bt, _ = losses.next_token_targets(batch)
  logits_btv = model.apply({'params': params}, batch['tokens'], batch['segment_ids'],
                           batch['positions'])
  return losses.token_log_probs(logits_btv.astype(jnp.float32) / temperature, targets_bt)


def clipped_policy_loss(log_probs_bt, old_log_probs_bt, reference_log_probs_bt,
                        advantages_bt, weights_bt, *, kl_weight: float, clip_low: float,
                        clip_high: float, sequence_ratio: bool = False):
  """GRPO's objective (Shao et al. 2024, eq. 3) on the log-probs of sampled completion
  tokens, as sums over tokens of `weights_bt` (which carry the aggregation, see
  `aggregate`).

  The policy-gradient term is PPO's clipped surrogate -min(ratio A, clip(ratio) A), where
  ratio = pi / pi_old, clipped to [1 - clip_low, 1 + clip_high], and pi_old is the policy
  that sampled: once the policy has moved past the clip from it on a token, in the
  direction its advantage A asks, that token stops pulling. With one update per rollout,
  pi_old is pi itself (`old_log_probs_bt` = stop_gradient(log_probs_bt)): the ratio is 1,
  the clip never acts, and the gradient is A times that of log pi. With
  `sequence_ratio` (GSPO, Zheng et al. 2025), every token of a completion takes the
  completion's ratio, exp of the mean of its tokens' log-ratios, and the gradient of log
  pi of its own token (GSPO-token: sg(s) pi / sg(pi)), so a completion is clipped as one.
  The KL penalty to the reference is the unbiased, non-negative estimator exp(r) - r - 1
  with r = log(pi_ref / pi) (Schulman 2020). Returns sums: loss, kl and clipped (the
  tokens the clip holds).
  """
  log_ratio_bt = log_probs_bt - old_log_probs_bt
  if sequence_ratio:
    mask_bt = (weights_bt > 0).astype(jnp.float32)
    mean_b = (jnp.sum(log_ratio_bt * mask_bt, axis=1)
              / jnp.maximum(jnp.sum(mask_bt, axis=1), 1.0))
    log_ratio_bt = (jax.lax.stop_gradient(mean_b)[:, None] + log_probs_bt
                    - jax.lax.stop_gradient(log_probs_bt))
  surrogate_bt, held_bt = clipped_surrogate(log_ratio_bt, advantages_bt, clip_low, clip_high)
  log_reference_ratio_bt = reference_log_probs_bt - log_probs_bt
  # exp(r) - 1 - r, accurate near r = 0.
  kl_bt = jnp.expm1(log_reference_ratio_bt) - log_reference_ratio_bt
  loss_bt = surrogate_bt + kl_weight * kl_bt
  return {'loss': jnp.sum(loss_bt * weights_bt), 'kl': jnp.sum(kl_bt * weights_bt),
          'clipped': jnp.sum(held_bt * weights_bt)}


def clipped_surrogate(log_ratio_bt, advantages_bt, clip_low: float, clip_high: float):
  """PPO's clipped surrogate per token, -min(ratio A, clip(ratio, 1 - low, 1 + high) A),
  and where the clip holds (the clipped term is the smaller)."""
  ratio_bt = jnp.exp(log_ratio_bt)
  unclipped_bt = ratio_bt * advantages_bt
  clipped_bt = jnp.clip(ratio_bt, 1 - clip_low, 1 + clip_high) * advantages_bt
  return -jnp.minimum(unclipped_bt, clipped_bt), clipped_bt < unclipped_bt


def aggregate(weights_bt, aggregation: str, max_new_tokens: int):
  """(token weights, count): a loss's sums over tokens with these weights, divided by the
  count, are its mean by `aggregation` (AGGREGATIONS). The counts of micro-batches and
  processes add up, so the mean is the whole batch's."""
  tokens_b = jnp.sum(weights_bt, axis=1)
  if aggregation == 'sequence_mean':  # Each completion's mean, then over completions.
    return weights_bt / jnp.maximum(tokens_b, 1.0)[:, None], jnp.sum(tokens_b > 0)
  if aggregation == 'constant':  # Dr. GRPO: every completion over the same budget.
    return weights_bt, jnp.float32(weights_bt.shape[0] * max_new_tokens)
  return weights_bt, jnp.sum(weights_bt)  # 'token_mean'


def grpo_loss(params, batch, reference_params, *, model, settings):
  """GRPO on rollout rows: [B, T] arrays of prompt + sampled completion, `loss_mask` on
  the completion, `advantages` on every token, and, when a rollout serves several
  updates, `old_log_probs` of the policy that sampled. The policy is the model at the
  sampling temperature; `settings` is config.train.grpo. Returns (loss sum, metric sums,
  count), the count by `settings.aggregation`."""
  _, mask_bt = losses.next_token_targets(batch)
  log_probs_bt = _policy_log_probs_bt(params, batch, model, settings.temperature)
  # Without them, this update is the rollout's only one (or an evaluation): the sampler
  # is the policy itself, and nothing is clipped.
  sampled_by_policy = 'old_log_probs' not in batch
  old_log_probs_bt = (jax.lax.stop_gradient(log_probs_bt) if sampled_by_policy
                      else batch['old_log_probs'])
  reference_bt = jax.lax.stop_gradient(
      _policy_log_probs_bt(reference_params, batch, model, settings.temperature))
  weights_bt, count = aggregate(mask_bt, settings.aggregation, settings.max_new_tokens)
  sums = clipped_policy_loss(
      log_probs_bt, old_log_probs_bt, reference_bt, batch['advantages'], weights_bt,
      kl_weight=settings.kl_weight, clip_low=settings.clip_epsilon,
      clip_high=settings.clip_epsilon_high or settings.clip_epsilon,
      sequence_ratio=settings.ratio == 'sequence')
  if sampled_by_policy:
    del sums['clipped']
  return sums['loss'], sums, count


def sampling_log_probs(params, batch, *, model, train_config):
  """`old_log_probs` [B, T] for a rollout's rows, before its first update; in
  micro-batches like the train step, as whole-batch logits may not fit."""
  log_probs = jax.lax.map(
      lambda rows: _policy_log_probs_bt(params, rows, model, train_config.grpo.temperature),
      losses.microbatches(batch, train_config.grad_accumulation_steps))
  return log_probs.reshape(batch['tokens'].shape)


class _TrainingRollouts:
  """Host prompts -> a device batch of the policy's completions, at the sampling key of
  the step (or evaluation batch), with the sampler's log-probs when a rollout serves
  several updates."""

  def __init__(self, setup, tokenizer, config, reward_models):
    self.rollouts = Rollouts(setup.model, tokenizer, config.train.grpo, config.data.seq_len,
                             setup.batch_sharding, reward_models)
    self.seed, self.batch_sharding = config.seed, setup.batch_sharding
    self.several_updates = config.train.grpo.updates_per_rollout > 1
    self.sampling_log_probs = jax.jit(
        functools.partial(sampling_log_probs, model=setup.model, train_config=config.train),
        in_shardings=(setup.params_shardings, setup.batch_sharding),
        out_shardings=setup.batch_sharding)

  def __call__(self, params, prompts: dict, step: int, *, train: bool, more_prompts=None,
               reference_params=None):
    del reference_params  # GRPO's KL is in its loss.
    batch, metrics = self.rollouts(params, prompts, rollout_key(self.seed, step, train=train),
                                   more_prompts if train else None)
    batch = sharding.global_batch(batch, self.batch_sharding)
    if train and self.several_updates:  # The later updates' ratios are against the sampler.
      batch['old_log_probs'] = self.sampling_log_probs(params, batch)
    return batch, metrics


class GRPO(base.Objective):
  name = 'grpo'
  sources = base.POST_TRAINING_SOURCES + base.ARITHMETIC_SOURCES

  def default_config(self):
    return default_config()

  def needs_reference(self, train_config) -> bool:
    del train_config
    return True  # The KL to it is penalised and logged (at any kl_weight).

  def validate(self, config) -> None:
    grpo, seq_len = config.train.grpo, config.data.seq_len
    check(not rewards.unknown(grpo.reward),
          f'config.train.grpo.reward={grpo.reward!r} is not one of {sorted(rewards.REWARDS)}'
          f" or {rewards.MODEL}<a reward model's workdir> (or several joined by '+')")
    name = 'config.train.grpo.'
    check_number(name + 'group_size', grpo.group_size, at_least=2,
                 why="a group's mean reward is each completion's baseline")
    check_number(name + 'max_new_tokens', grpo.max_new_tokens, at_least=1, below=seq_len,
                 why='config.data.seq_len: prompts get the rest of the row')
    check_number(name + 'temperature', grpo.temperature, above=0)
    check_number(name + 'kl_weight', grpo.kl_weight, at_least=0)
    check_number(name + 'updates_per_rollout', grpo.updates_per_rollout, at_least=1)
    check_number(name + 'clip_epsilon', grpo.clip_epsilon, above=0)
    check_number(name + 'clip_epsilon_high', grpo.clip_epsilon_high, at_least=0,
                 why='0 is clip_epsilon')
    for field, allowed in (('advantage', sorted(ADVANTAGES)), ('aggregation', AGGREGATIONS),
                           ('ratio', RATIOS)):
      check(grpo[field] in allowed,
            f'config.train.grpo.{field}={grpo[field]!r} is not one of {list(allowed)}')
    check_number(name + 'dynamic_sampling_rounds', grpo.dynamic_sampling_rounds, at_least=0)
    # Checkpoints fall between rollouts, so that a resumed run samples where it stopped.
    every = config.checkpoint.every_steps
    check(every % grpo.updates_per_rollout == 0,
          f'config.checkpoint.every_steps={every} must be a multiple of'
          f' config.train.grpo.updates_per_rollout={grpo.updates_per_rollout}')

  def build_source(self, data_config):
    # A reward may read any field of a JSON line, such as a reference answer.
    return base.stdlib_or_jsonl_examples(data_config, ('prompt',), keep_all=True)

  def data_seq_len(self, config) -> int:
    return config.data.seq_len - config.train.grpo.max_new_tokens  # Completions fill the rest.

  def rows(self, dataset, tokenizer, seq_len: int, counts=None):
    """{'example' (JSON text), 'prompt_tokens' int32 [seq_len], 'prompt_length'}."""
    return pipeline.examples(dataset).map(TokenizePrompt(tokenizer, seq_len)).filter(
        prompt_fits)

  def rows_per_example(self, train_config) -> int:
    return train_config.grpo.group_size

  def batch_shapes(self, config) -> dict:
    """A rollout's batch: group_size rows per prompt."""
    shape = (config.data.batch_size * config.train.grpo.group_size, config.data.seq_len)
    shapes = {name: jax.ShapeDtypeStruct(shape, jnp.int32)
              for name in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
    floats = ('advantages', 'old_log_probs') if config.train.grpo.updates_per_rollout > 1 else (
        'advantages',)
    return {**shapes, **{name: jax.ShapeDtypeStruct(shape, jnp.float32) for name in floats}}

  def loss(self, params, batch, reference_params, *, model, settings):
    return grpo_loss(params, batch, reference_params, model=model, settings=settings)

  def record_fields(self, train_config):
    reward = train_config[self.name].reward
    needed = rewards.fields(reward)
    return (needed, f'config.train.{self.name}.reward={reward!r}') if needed else ()

  def models_read(self, train_config) -> list[tuple[str, str, str]]:
    return [(f'config.train.{self.name}.reward', workdir, 'score')
            for workdir in rewards.model_workdirs(train_config[self.name].reward)]

  def make_rollout(self, setup, tokenizer, config, models=()):
    return _TrainingRollouts(setup, tokenizer, config, models)

  def updates_per_batch(self, train_config) -> int:
    return train_config.grpo.updates_per_rollout
