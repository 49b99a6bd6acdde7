"""GRPO: its loss against direct computations, rewards and rollout rows; steps that learn
and runs are in tests/integration/test_grpo_runs.py."""

import functools
import json
import threading
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm import objectives, tokenizer as tokenizer_lib
from lm.data import pipeline
from lm.errors import ConfigError
from lm import math_answers
from lm.objectives import grpo, rewards

from helpers import constant_rate_train_config, init_model, small_model_config

TOKENIZER = tokenizer_lib.ByteTokenizer()
PROMPTS = [[{'prompt': f'question {i}?', 'answer': str(i)}] for i in range(12)]


def grpo_config(**overrides):
  config = grpo.default_config()
  config.update(reward='python_function', group_size=4, max_new_tokens=24, temperature=0.8,
                kl_weight=0.1)
  config.update(overrides)
  return config


def prompt_batch(batch_size=2, seq_len=24):
  return next(iter(pipeline.make_dataset(PROMPTS, objectives.OBJECTIVES['grpo'], TOKENIZER,
                                         seq_len=seq_len, batch_size=batch_size, seed=0,
                                         train=False)))


@pytest.mark.parametrize('policy_moved, clip_high', [(False, 0.2), (True, 0.2), (True, 0.28)])
def test_grpo_loss_and_its_gradient_match_the_per_token_formulas(policy_moved, clip_high):
  keys = jax.random.split(jax.random.key(int(policy_moved) + int(100 * clip_high)), 5)
  log_probs = -jax.random.uniform(keys[0], (3, 7), minval=0.1, maxval=3.0)
  reference = log_probs + 0.3 * jax.random.normal(keys[1], (3, 7))
  advantages = jnp.repeat(jax.random.normal(keys[2], (3, 1)), 7, axis=1)
  weights = (jax.random.uniform(keys[3], (3, 7)) < 0.7).astype(jnp.float32)
  # A later update on the rollout: the sampler's log-probs differ from the policy's by up
  # to ratios of e^+-0.5, past the clip's 1 - 0.2 and 1 + clip_high on some tokens.
  old = log_probs + (jax.random.uniform(keys[4], (3, 7), minval=-0.5, maxval=0.5)
                     if policy_moved else 0.0)
  beta, low = 0.2, 0.2
  loss = lambda x, old: grpo.clipped_policy_loss(x, old, reference, advantages, weights,
                                                 kl_weight=beta, clip_low=low,
                                                 clip_high=clip_high)
  sums = loss(log_probs, old)
  lp, old_, ref, adv, w = map(lambda x: np.asarray(x, np.float64),
                              (log_probs, old, reference, advantages, weights))
  kl = np.exp(ref - lp) - (ref - lp) - 1
  ratio = np.exp(lp - old_)
  # PPO's surrogate holds a token once its ratio is past the clip in its advantage's way.
  held = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - low) & (adv < 0))
  surrogate = np.where(held, np.clip(ratio, 1 - low, 1 + clip_high), ratio) * adv
  np.testing.assert_allclose(sums['kl'], np.sum(w * kl), rtol=1e-5)
  np.testing.assert_allclose(sums['loss'], np.sum(w * (-surrogate + beta * kl)), rtol=1e-5)
  np.testing.assert_allclose(sums['clipped'], np.sum(w * held))
  assert np.all(kl >= 0) and (np.sum(w * held) > 0) == policy_moved
  grad = jax.grad(lambda x: loss(x, old)['loss'])(log_probs)
  np.testing.assert_allclose(
      grad, w * (-np.where(held, 0, ratio * adv) + beta * (1 - np.exp(ref - lp))),
      rtol=1e-5, atol=1e-7)
  if not policy_moved:  # One update per rollout: the policy is its own sampler.
    on_policy = jax.grad(lambda x: loss(x, jax.lax.stop_gradient(x))['loss'])(log_probs)
    np.testing.assert_allclose(on_policy, grad, rtol=1e-6)


def test_gspo_clips_each_completion_by_its_geometric_mean_ratio():
  """GSPO (Zheng et al. 2025): s = exp(mean over a completion's tokens of log pi/pi_old),
  one clip decision per completion, and the gradient s A grad log pi on each token."""
  keys = jax.random.split(jax.random.key(7), 5)
  log_probs = -jax.random.uniform(keys[0], (6, 5), minval=0.1, maxval=3.0)
  reference = log_probs + 0.3 * jax.random.normal(keys[1], (6, 5))
  advantages = jnp.repeat(jax.random.normal(keys[2], (6, 1)), 5, axis=1)
  weights = (jax.random.uniform(keys[3], (6, 5)) < 0.8).astype(jnp.float32)
  weights = weights.at[:, 0].set(1.0)  # Every completion has a token.
  old = log_probs + jax.random.uniform(keys[4], (6, 5), minval=-0.6, maxval=0.6)
  beta, low, high = 0.1, 0.05, 0.08
  loss = lambda x: grpo.clipped_policy_loss(x, old, reference, advantages, weights,
                                            kl_weight=beta, clip_low=low, clip_high=high,
                                            sequence_ratio=True)
  lp, old_, ref, adv, w = map(lambda x: np.asarray(x, np.float64),
                              (log_probs, old, reference, advantages, weights))
  s = np.exp(np.sum((lp - old_) * w, axis=1) / np.sum(w, axis=1))[:, None]
  held = ((s > 1 + high) & (adv > 0)) | ((s < 1 - low) & (adv < 0))
  assert 0 < held[:, 0].sum() < 6  # Both kinds of completion are checked.
  kl = np.exp(ref - lp) - (ref - lp) - 1
  surrogate = np.where(held, np.clip(s, 1 - low, 1 + high), s) * adv
  sums = loss(log_probs)
  np.testing.assert_allclose(sums['loss'], np.sum(w * (-surrogate + beta * kl)), rtol=1e-5)
  np.testing.assert_allclose(sums['clipped'], np.sum(w * held))
  np.testing.assert_allclose(
      jax.grad(lambda x: loss(x)['loss'])(log_probs),
      w * (-np.where(held, 0, s * adv) + beta * (1 - np.exp(ref - lp))), rtol=1e-5, atol=1e-7)


def test_aggregations_divide_the_token_sums_as_their_papers_do():
  weights = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], jnp.float32)
  losses_bt = jnp.array([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0] * 4])
  mean = lambda aggregation: (lambda w, count: float(jnp.sum(losses_bt * w) / count))(
      *grpo.aggregate(weights, aggregation, max_new_tokens=5))
  assert mean('token_mean') == pytest.approx((1 + 2 + 3 + 4) / 4)  # DAPO.
  assert mean('sequence_mean') == pytest.approx((2 + 4) / 2)  # GRPO: an empty row is none.
  assert mean('constant') == pytest.approx((1 + 2 + 3 + 4) / (3 * 5))  # Dr. GRPO.


def test_advantages_of_the_grpo_family():
  rewards_b = np.array([1, 0, 0, 1, 2, 2, 2, 2, 0, 0, 0, 3], np.float32)
  groups = rewards_b.reshape(3, 4)
  others = (groups.sum(axis=1, keepdims=True) - groups) / 3  # RLOO's leave-one-out mean.
  np.testing.assert_allclose(grpo.group_advantages(rewards_b, 4, 'rloo'),
                             (groups - others).reshape(-1), rtol=1e-6)
  np.testing.assert_allclose(grpo.group_advantages(rewards_b, 4, 'dr_grpo'),
                             (groups - groups.mean(axis=1, keepdims=True)).reshape(-1))
  np.testing.assert_array_equal(grpo.informative_groups(rewards_b, 4), [True, False, True])


def test_group_advantages_compare_each_reward_with_its_own_group():
  advantages = grpo.group_advantages(np.array([1, 0, 0, 1, 2, 2, 2, 2, 0, 0, 0, 3]), 4)
  np.testing.assert_allclose(advantages[:8], [1, -1, -1, 1, 0, 0, 0, 0], atol=1e-5)
  np.testing.assert_allclose(advantages[8:], np.array([-1, -1, -1, 3]) / np.sqrt(3),
                             rtol=1e-5)


@pytest.mark.parametrize('completion, finished, want', [
    ('    return a + b\n', True, 1.0),
    ('    return a\n', True, 0.5),  # b is never read.
    ('    b = a\n    return a\n', True, 0.5),  # b is written, not read.
    ('    return a + b\n', False, 0.0),  # Cut off by the token budget.
    ('    return a +\n', True, 0.0),
    ('', True, 0.0),  # The docstring alone.
    ('    return a + b\nx = 1\n', True, 0.0),  # Code after the function.
])
def test_python_function_reward(completion, finished, want):
  example = {'prompt': 'def add(self, a, *, b):\n    """Sum."""\n'}
  assert rewards.python_function(example, completion, finished) == want


def test_exact_match_reward_compares_with_the_answer_field():
  example = {'prompt': '2 + 3 =', 'answer': '5'}
  assert rewards.exact_match(example, ' 5\n', True) == 1.0
  assert rewards.exact_match(example, ' 5', False) == 0.0  # Cut off: not an answer.
  assert rewards.exact_match(example, '55', True) == 0.0
  with pytest.raises(ConfigError, match=r"needs an 'answer' field.*\['prompt'\]"):
    rewards.exact_match({'prompt': '2 + 3 ='}, '5', True)


@pytest.mark.parametrize('completion, finished, answer, want', [
    ('3 + 4 = 7 and 7 * 2 = 14.\n#### 14', True, '14', 1.0),
    ('Half of it: \\boxed{\\frac{1}{2}}', True, '0.5', 1.0),  # LaTeX against a decimal.
    ('So 1,234 in all. #### 1,234', True, '1234', 1.0),
    ('The answer is 3/4.', True, '0.75', 1.0),  # No mark: math-verify's own extraction.
    ('She pays 5 + 7 = 12 dollars. #### 12', True, 'Natalia pays 5 + 7 = 12. #### 12', 1.0),
    ('2 + 2 = 4 #### 4', True, '5', 0.0),
    ('#### 14', False, '14', 0.0),  # Cut off by the token budget.
    ('', True, '14', 0.0)])
def test_math_reward_compares_final_answers_as_math_verify_does(completion, finished, answer,
                                                               want):
  assert rewards.math({'prompt': 'q', 'answer': answer}, completion, finished) == want


def test_math_format_and_summed_rewards():
  example = {'prompt': 'q', 'answer': '14'}
  reward = rewards.get('math+math_format')
  assert reward(example, 'so #### 14', True) == pytest.approx(1.1)
  assert reward(example, 'so \\boxed{13}', True) == pytest.approx(0.1)
  assert reward(example, 'it is 14', True) == 1.0 and reward(example, '#### 14', False) == 0.0
  assert rewards.unknown('math+maths+math_format') == ['maths']
  with pytest.raises(ConfigError, match=r"reward='math' needs an 'answer' field"):
    rewards.math({'prompt': 'q'}, '#### 1', True)


def test_the_math_reward_runs_outside_the_main_thread():
  """math-verify's timeouts are signals, which only the main thread may set."""
  results = []
  thread = threading.Thread(target=lambda: results.append(
      math_answers.same('#### 3', '3')))
  thread.start()
  thread.join()
  assert results == [True]


def test_grpo_jsonl_examples_keep_every_field_for_the_reward(tmp_path):
  path = tmp_path / 'prompts.jsonl'
  path.write_text('{"prompt": "2 + 3 =", "answer": 5}\n{"answer": "1"}\n')
  config = ml_collections.ConfigDict(dict(source='jsonl', path=str(path), bad_records='error'))
  with pytest.raises(ConfigError, match=r"prompts.jsonl:2 has no field 'prompt'"):
    objectives.OBJECTIVES['grpo'].source(config)
  config.bad_records = 'skip'
  source = objectives.OBJECTIVES['grpo'].source(config)
  assert len(source) == 1 and source[0] == [{'prompt': '2 + 3 =', 'answer': '5'}]


@pytest.mark.parametrize('objective', ['grpo', 'ppo'])
def test_a_reward_that_reads_an_answer_is_refused_at_start_where_an_example_has_none(
    objective, tmp_path):
  path = tmp_path / 'prompts.jsonl'
  path.write_text('{"prompt": "2 + 3 =", "answer": 5}\n{"prompt": "1 + 1 ="}\n')
  data = ml_collections.ConfigDict(dict(source='jsonl', path=str(path), bad_records='error'))
  train = constant_rate_train_config(**{objective: objectives.OBJECTIVES[objective]
                                        .default_config()})
  train[objective].reward = 'math+math_format'
  with pytest.raises(ConfigError, match=rf"prompts.jsonl:2: no field 'answer', which config"
                     rf".train.{objective}.reward='math\+math_format' reads in every example"):
    objectives.OBJECTIVES[objective].source(data, train)
  train[objective].reward = 'math_format'  # Reads no answer.
  assert len(objectives.OBJECTIVES[objective].source(data, train)) == 2
  data.source = 'stdlib_functions'  # Function bodies: no answers to compare with.
  train[objective].reward = 'exact_match'
  with pytest.raises(ConfigError, match=r": no field 'answer', which config.train"):
    objectives.OBJECTIVES[objective].source(data, train)


def test_grpo_prompts_are_examples_and_padded_tokens_and_long_ones_are_skipped():
  examples = [[{'prompt': 'x' * 30}], [{'prompt': 'short', 'answer': 'a'}],
              [{'prompt': 'also short', 'answer': 'b'}]]
  [batch] = list(pipeline.make_dataset(examples, objectives.OBJECTIVES['grpo'], TOKENIZER,
                                       seq_len=16, batch_size=2, seed=0, train=False))
  kept = [json.loads(text) for text in batch['example']]
  assert kept == [examples[1][0], examples[2][0]]
  np.testing.assert_array_equal(batch['prompt_length'], [6, 11])
  for tokens, length, example in zip(batch['prompt_tokens'], batch['prompt_length'], kept):
    assert tokens[0] == TOKENIZER.bos_id and (tokens[length:] == 0).all()
    assert TOKENIZER.decode(tokens[1:length]) == example['prompt']


@functools.cache
def grpo_model():
  """A one-layer model of the byte tokenizer's vocabulary and its params, made once for
  the tests (which only read them)."""
  return init_model(small_model_config(vocab_size=TOKENIZER.vocab_size, num_layers=1),
                    length=8)


def rollout(reward, rng):
  """A rollout of the first four prompts, with the model above: 16 rows of 64 tokens, up to
  40 of them sampled (the same shapes for each test: the sampler compiles once)."""
  model, params = grpo_model()
  make = grpo.Rollouts(model, TOKENIZER, grpo_config(reward=reward, max_new_tokens=40),
                       seq_len=64)
  return make(params, prompt_batch(batch_size=4), rng)


def test_rollout_rows_are_prompt_then_completion_with_group_advantages(monkeypatch):
  seen = []

  def reward(example, completion, finished):  # Records its calls; rewards length.
    seen.append((example, completion, finished))
    return float(len(completion))

  monkeypatch.setitem(rewards.REWARDS, 'recorded', reward)
  batch, metrics = rollout('recorded', jax.random.key(3))
  assert batch['tokens'].shape == batch['advantages'].shape == (16, 64)
  finished = np.array([f for _, _, f in seen])
  assert 0 < finished.sum() < 16  # Both kinds of row are checked below.
  for row, (example, completion, was_finished) in enumerate(seen):
    assert example == PROMPTS[row // 4][0]  # The validation stream is in order.
    prompt = example['prompt']
    length = int(batch['segment_ids'][row].sum())
    tokens, loss_mask = batch['tokens'][row, :length], batch['loss_mask'][row, :length]
    assert tokens[0] == TOKENIZER.bos_id and TOKENIZER.decode(tokens[1:][loss_mask[1:] == 0]) == prompt
    generated = tokens[loss_mask == 1]
    assert was_finished == (generated[-1] == TOKENIZER.eos_id)
    assert was_finished or len(generated) == 40  # Only the token budget cuts one short.
    assert TOKENIZER.decode(generated[:-1] if was_finished else generated) == completion
    assert (batch['tokens'][row, length:] == 0).all() and (batch['loss_mask'][row, length:] == 0).all()
    np.testing.assert_array_equal(batch['positions'][row, :length], np.arange(length))
  want = grpo.group_advantages(np.array([len(c) for _, c, _ in seen]), 4)
  np.testing.assert_allclose(batch['advantages'], np.repeat(want[:, None], 64, axis=1))
  assert metrics['finished'] == finished.mean()


def train_config(**grpo):
  return constant_rate_train_config(objective='grpo', grpo=grpo_config(**grpo),
                                    learning_rate=1e-2, num_steps=100)


def test_grpo_loss_at_the_reference_is_the_advantage_weighted_log_likelihood_gradient():
  model, params = grpo_model()
  batch, _ = rollout('python_function', jax.random.key(0))
  # Rewards are all 0 here: give the rows advantages of their own.
  batch['advantages'] = np.repeat(np.linspace(-1.5, 1.5, 16, dtype=np.float32)[:, None], 64, 1)
  batch = jax.tree.map(jnp.asarray, batch)
  config = train_config(temperature=0.8)
  loss = functools.partial(grpo.grpo_loss, model=model, settings=config.grpo)
  # At the reference the policy's log-probs are the reference's, computed alike: KL is 0.
  _, sums, count = jax.jit(loss)(params, batch, params)
  assert sums['kl'] == 0 and count == batch['loss_mask'].sum()

  @jax.jit
  def sums_and_grads(params, batch):  # The loss's sums and its gradient, in one program.
    def total(policy):
      total, sums, _ = loss(policy, batch, params)
      return total, sums
    (_, sums), grads = jax.value_and_grad(total, has_aux=True)(params)
    return sums, grads
  _, grads = sums_and_grads(params, batch)

  def weighted_log_likelihood(params):  # Token by token, at the sampling temperature.
    logits = model.apply({'params': params}, batch['tokens'], batch['segment_ids'],
                         batch['positions'])
    log_probs = jax.nn.log_softmax(logits / 0.8)[:, :-1]  # Position t - 1 predicts t.
    chosen = jnp.take_along_axis(log_probs, batch['tokens'][:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(batch['advantages'][:, :1] * batch['loss_mask'][:, 1:] * chosen)
  want = jax.tree.map(jnp.negative, jax.jit(jax.grad(weighted_log_likelihood))(params))
  # Two float32 sums over 16 rows in different orders: seen 2.4e-6 apart where 1e-2.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, want)

  # A first update with the sampler's log-probs, as when a rollout serves several: they
  # are the policy's own (micro-batched here), so the same gradient and nothing clipped.
  in_halves = constant_rate_train_config(objective='grpo', grpo=config.grpo,
                                         grad_accumulation_steps=2)
  batch['old_log_probs'] = grpo.sampling_log_probs(params, batch, model=model,
                                                    train_config=in_halves)
  sums, grads = sums_and_grads(params, batch)
  assert sums['clipped'] == 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, want)


@pytest.mark.parametrize('informative, rounds, want', [
    # Two groups with an advantage per batch of four prompts: a second batch fills it.
    ({1, 3, 5, 7, 9, 11}, 3, [1, 3, 5, 7]),
    # One per batch and one more batch allowed: the rest are the first groups without one.
    ({1, 5, 9}, 1, [1, 5, 0, 2])])
def test_dynamic_sampling_replaces_groups_whose_rewards_are_all_equal(monkeypatch, informative,
                                                                      rounds, want):
  def reward(example, completion, finished):  # Differs within a group of `informative`.
    del finished
    return float(zlib.crc32(completion.encode()) % 97) if int(example['answer']) in (
        informative) else 1.0
  monkeypatch.setitem(rewards.REWARDS, 'some_prompts', reward)
  model, params = grpo_model()
  make = grpo.Rollouts(model, TOKENIZER, grpo_config(reward='some_prompts', max_new_tokens=40,
                                                     dynamic_sampling_rounds=rounds),
                       seq_len=64)
  prompts = iter(pipeline.make_dataset(PROMPTS, objectives.OBJECTIVES['grpo'], TOKENIZER,
                                       seq_len=24, batch_size=4, seed=0, train=False))
  batch, metrics = make(params, next(prompts), jax.random.key(3),
                        more_prompts=lambda: next(prompts))
  assert batch['tokens'].shape == (16, 64)
  questions = []
  for row in range(16):
    length = int(batch['segment_ids'][row].sum())
    tokens, loss_mask = batch['tokens'][row, :length], batch['loss_mask'][row, :length]
    questions.append(TOKENIZER.decode(tokens[1:][loss_mask[1:] == 0]))
  assert questions == [f'question {i}?' for i in want for _ in range(4)]
  assert metrics['sampling_rounds'] == 2
  assert metrics['informative_groups'] == sum(i in informative for i in want) / 4
  advantages = batch['advantages'][:, 0].reshape(4, 4)
  for group, i in zip(advantages, want):  # Groups without an advantage train on none.
    assert (np.abs(group).max() > 0.1) == (i in informative)
