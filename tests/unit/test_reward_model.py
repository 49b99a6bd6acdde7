"""The reward model (lm/objectives/reward_model.py): Bradley-Terry with margin and centring
against its formula and its gradient, the score read at each row's last real token, and
its pairs' optional margin; its runs are in tests/integration/test_reward_model_runs.py."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm import objectives
from lm.errors import ConfigError
from lm.objectives import reward_model

from helpers import init_model, small_model_config

# Three pairs: column 0 the chosen response's reward, 1 the rejected's.
REWARDS = np.array([[1.5, -0.5], [-0.2, 0.9], [0.3, 0.3]])
MARGINS = np.array([0.0, 1.0, 0.5])
C = 0.05


def bradley_terry(chosen, rejected, margin, c):
  """-log sigmoid(r_w - r_l - m) + c (r_w + r_l)^2, for one pair, in float64."""
  return math.log1p(math.exp(-(chosen - rejected - margin))) + c * (chosen + rejected) ** 2


@pytest.mark.parametrize('c', [0.0, C])
def test_the_loss_and_its_gradient_are_bradley_terry_with_margin_and_centring(c):
  sums = reward_model.pair_loss(jnp.asarray(REWARDS, jnp.float32),
                                jnp.asarray(MARGINS, jnp.float32), c)
  want = [bradley_terry(*pair, margin, c) for pair, margin in zip(REWARDS, MARGINS)]
  np.testing.assert_allclose(sums['loss'], want, rtol=1e-6)
  np.testing.assert_array_equal(sums['accuracy'], [1, 0, 0])  # A tie is not ranked right.
  np.testing.assert_allclose(sums['margin'], REWARDS[:, 0] - REWARDS[:, 1], rtol=1e-6)
  # d/dr_w = -(1 - sigmoid(d - m)) + 2c(r_w + r_l); d/dr_l = (1 - sigmoid(d - m)) + 2c(...).
  grad = jax.grad(lambda r: jnp.sum(reward_model.pair_loss(r, jnp.asarray(MARGINS), c)[
      'loss']))(jnp.asarray(REWARDS, jnp.float32))
  d = REWARDS[:, 0] - REWARDS[:, 1] - MARGINS
  push = 1 - 1 / (1 + np.exp(-d))
  centre = 2 * c * REWARDS.sum(axis=1)
  np.testing.assert_allclose(grad, np.stack([-push + centre, push + centre], axis=1),
                             rtol=1e-5, atol=1e-7)


def test_the_reward_is_the_score_at_each_rows_last_real_token():
  scores = jnp.arange(12.0).reshape(3, 4)
  segment_ids = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
  np.testing.assert_array_equal(reward_model.last_token_scores(scores, segment_ids),
                                [1.0, 7.0, 8.0])


def test_a_score_head_model_gives_a_number_per_token_from_the_same_trunk():
  lm_config = small_model_config()
  score_config = ml_collections.FrozenConfigDict({**lm_config.as_configdict().to_dict(),
                                                  'head': 'score'})
  lm_model, lm_params = init_model(lm_config, length=8)
  score_model, score_params = init_model(score_config, length=8)
  assert 'score' in score_params and score_params['score']['kernel'].shape == (
      lm_config.embed_dim, 1)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, lm_config.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  ones = jnp.ones_like(tokens)
  scores = score_model.apply({'params': score_params}, tokens, ones, positions)
  assert scores.shape == (2, 8) and scores.dtype == jnp.float32
  # The score is the final norm's output times the head: the trunk's features, read
  # through the LM's own params, give the same number.
  trunk = {name: value for name, value in score_params.items() if name != 'score'}
  _, features = lm_model.apply({'params': {**lm_params, **trunk}}, tokens, ones, positions,
                               capture_intermediates=True, mutable=['intermediates'])
  final = features['intermediates']['final_norm']['__call__'][0]
  np.testing.assert_allclose(scores, final @ score_params['score']['kernel'][:, 0],
                             rtol=1e-5, atol=1e-6)


def test_a_pairs_margin_is_an_optional_number_named_by_file_and_line(tmp_path):
  path = tmp_path / 'pairs.jsonl'
  lines = [{'prompt': 'p', 'chosen': 'a', 'rejected': 'b'},
           {'prompt': 'p', 'chosen': 'a', 'rejected': 'b', 'margin': 2}]
  path.write_text(''.join(json.dumps(line) + '\n' for line in lines))
  data = ml_collections.ConfigDict(dict(source='jsonl', path=str(path), bad_records='error'))
  source = objectives.get('reward_model').source(data)
  assert [source[i][0].get('margin') for i in range(2)] == [None, 2.0]
  path.write_text(path.read_text() + json.dumps({**lines[1], 'margin': 'big'}) + '\n')
  with pytest.raises(ConfigError, match=r"pairs.jsonl:3: field 'margin' is \"big\", not a"
                     ' finite number'):
    objectives.get('reward_model').source(data)
  path.write_text(json.dumps({'prompt': 'p', 'chosen': 'a'}) + '\n')
  with pytest.raises(ConfigError, match=r"pairs.jsonl:1 has no field 'rejected'"):
    objectives.get('reward_model').source(data)
