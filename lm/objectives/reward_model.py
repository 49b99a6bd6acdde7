"""A reward model (InstructGPT's, Ouyang et al. 2022): the decoder with a scalar head
(config.model.head 'score'), its reward for a prompt and response read at the response's
last token (its eos), trained on {prompt, chosen, rejected} pairs with the Bradley-Terry
loss

    -log sigmoid(r_chosen - r_rejected - margin) + c (r_chosen + r_rejected)^2

where `margin` is a pair's optional 'margin' field (Llama 2's graded preferences; 0 when
absent) and c is config.train.reward_model.center_coefficient (TRL's
center_rewards_coefficient: it keeps rewards near zero, as Bradley-Terry fixes only their
differences). Pairs are read and cut as DPO reads them (lm/objectives/dpo.py). A trained
reward model is a reward for GRPO by its workdir (lm/objectives/rewards.py, 'model:').
"""

import functools
from typing import NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lm import sharding
from lm.data import pipeline
from lm.errors import check_number
from lm.objectives import base, dpo

FIELDS = ('prompt', 'chosen', 'rejected')
ROW_FIELDS = ('tokens', 'segment_ids', 'positions', 'loss_mask')


class Settings(NamedTuple):
  """config.train.reward_model, with its defaults (`default_config`)."""
  # c of c (r_chosen + r_rejected)^2; TRL suggests 0.01 where it is used.
  center_coefficient: float = 0.0


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(Settings()._asdict())


def last_token_scores(scores_bt, segment_ids_bt):
  """Each row's score at its last real token, [B]: rows are one sequence from position 0,
  padded after (segment id 0)."""
  last_b = jnp.maximum(jnp.sum(segment_ids_bt != 0, axis=-1) - 1, 0)
  return jnp.take_along_axis(scores_bt, last_b[:, None], axis=-1)[:, 0]


def pair_loss(rewards_b2, margin_b, center_coefficient: float):
  """Per-pair sums {name: [B]}: the Bradley-Terry loss with margin and centring, whether
  the chosen response scored higher (accuracy), r_chosen - r_rejected (margin) and each
  side's reward."""
  difference_b = rewards_b2[:, 0] - rewards_b2[:, 1]
  loss_b = -jax.nn.log_sigmoid(difference_b - margin_b)
  if center_coefficient:
    loss_b += center_coefficient * jnp.square(rewards_b2[:, 0] + rewards_b2[:, 1])
  return {'loss': loss_b, 'accuracy': (difference_b > 0).astype(jnp.float32),
          'margin': difference_b, 'chosen_reward': rewards_b2[:, 0],
          'rejected_reward': rewards_b2[:, 1]}


class _TokenizePairWithMargin(grain.transforms.Map):
  """DPO's [2, seq_len] rows of a pair, and its 'margin' (float32, 0 when absent)."""

  def __init__(self, tokenizer, seq_len: int, counts=None):
    self.pair = dpo.TokenizePair(tokenizer, seq_len, counts)

  def map(self, example: dict) -> dict:
    return {**self.pair.map(example), 'margin': np.float32(example.get('margin', 0.0))}


class RewardModel(base.Objective):
  name = 'reward_model'
  sources = base.POST_TRAINING_SOURCES + base.ARITHMETIC_SOURCES
  count_name = 'num_pairs'

  def default_config(self):
    return default_config()

  def model_head(self, train_config) -> str:
    return 'score'

  def validate(self, config) -> None:
    check_number('config.train.reward_model.center_coefficient',
                 config.train.reward_model.center_coefficient, at_least=0)

  def build_source(self, data_config):
    return base.stdlib_or_jsonl_examples(data_config, FIELDS, pairs=True,
                                         numbers=('margin',))

  def rows(self, dataset, tokenizer, seq_len: int, counts=None):
    """{'tokens', 'segment_ids', 'positions', 'loss_mask'} int32 [2, seq_len] (chosen,
    rejected) and 'margin' float32 []."""
    return pipeline.examples(dataset).map(
        _TokenizePairWithMargin(tokenizer, seq_len, counts)).filter(
            pipeline.HasTargets(counts))

  def rows_per_example(self, train_config) -> int:
    return 2

  def batch_shapes(self, config) -> dict:
    size, seq_len = config.data.batch_size, config.data.seq_len
    shapes = {name: jax.ShapeDtypeStruct((size, 2, seq_len), jnp.int32) for name in ROW_FIELDS}
    return {**shapes, 'margin': jax.ShapeDtypeStruct((size,), jnp.float32)}

  def sample_prompt(self, validation_documents, tokenizer, max_length: int) -> None:
    return None  # A reward model scores; it does not write.

  def loss(self, params, batch, reference_params, *, model, settings):
    """Bradley-Terry on [B, 2, T] pairs (`settings`: config.train.reward_model). Returns
    (loss sum, metric sums, number of pairs)."""
    del reference_params
    rows = {name: batch[name].reshape(-1, batch[name].shape[-1]) for name in ROW_FIELDS}
    rewards_b2 = rewards(params, rows, model=model).reshape(-1, 2)
    sums = {name: jnp.sum(value) for name, value in pair_loss(
        rewards_b2, batch['margin'], settings.center_coefficient).items()}
    return sums['loss'], sums, jnp.asarray(rewards_b2.shape[0], jnp.float32)


def rewards(params, rows, *, model):
  """A reward model's reward of each row ('tokens', 'segment_ids', 'positions' [B, T]):
  its score at the row's last token, [B]."""
  scores_bt = model.apply({'params': params}, rows['tokens'], rows['segment_ids'],
                          rows['positions'])
  return last_token_scores(scores_bt, rows['segment_ids'])


class Scorer:
  """A trained reward model as a reward (config.train.grpo.reward 'model:<workdir>'): its
  score of each row (bos + prompt + completion, as rollouts build them), read at the
  row's last token, over this process's rows of a global batch at once."""

  def __init__(self, model, params, batch_sharding=None):
    self.params, self.batch_sharding = params, batch_sharding
    self.score = jax.jit(functools.partial(rewards, model=model))

  def __call__(self, rows: dict) -> np.ndarray:
    """{'tokens', 'segment_ids', 'positions'} int32 [B, T] numpy -> float32 [B]."""
    rows = {name: rows[name] for name in ('tokens', 'segment_ids', 'positions')}
    if self.batch_sharding is None:
      return np.asarray(self.score(self.params, rows))
    scores_b = self.score(self.params, sharding.global_batch(rows, self.batch_sharding))
    spec = jax.sharding.PartitionSpec(self.batch_sharding.spec[0])
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        scores_b, self.batch_sharding.mesh, spec))
