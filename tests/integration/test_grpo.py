"""GRPO: its loss against direct computations, rewards, rollout rows, and runs that learn
and resume."""

import functools
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import grpo as grpo_config_module
from lm import objectives, tokenizer as tokenizer_lib
from lm.data import pipeline
from lm.errors import ConfigError
from lm.objectives import grpo, rewards
from lm.training import logger as logger_lib, loop, optimizer as optimizer_lib, steps

from helpers import (constant_rate_train_config, init_model, post_training_config,
                     small_model_config)

TOKENIZER = tokenizer_lib.ByteTokenizer()
PROMPTS = [[{'prompt': f'question {i}?', 'answer': str(i)}] for i in range(12)]


def grpo_config(**overrides):
  config = ml_collections.ConfigDict(dict(reward='python_function', group_size=4,
                                          max_new_tokens=24, temperature=0.8, kl_weight=0.1))
  config.update(overrides)
  return config


def prompt_batch(batch_size=2, seq_len=24):
  return next(iter(pipeline.make_dataset(PROMPTS, objectives.OBJECTIVES['grpo'], TOKENIZER,
                                         seq_len=seq_len, batch_size=batch_size, seed=0,
                                         train=False)))


@pytest.mark.parametrize('policy_moved', [False, True])
def test_grpo_loss_and_its_gradient_match_the_per_token_formulas(policy_moved):
  keys = jax.random.split(jax.random.key(int(policy_moved)), 5)
  log_probs = -jax.random.uniform(keys[0], (3, 7), minval=0.1, maxval=3.0)
  reference = log_probs + 0.3 * jax.random.normal(keys[1], (3, 7))
  advantages = jnp.repeat(jax.random.normal(keys[2], (3, 1)), 7, axis=1)
  weights = (jax.random.uniform(keys[3], (3, 7)) < 0.7).astype(jnp.float32)
  # A later update on the rollout: the sampler's log-probs differ from the policy's by up
  # to ratios of e^+-0.5, past the clip's 1 +- 0.2 on some tokens.
  old = log_probs + (jax.random.uniform(keys[4], (3, 7), minval=-0.5, maxval=0.5)
                     if policy_moved else 0.0)
  beta, epsilon = 0.2, 0.2
  loss = lambda x, old: grpo.clipped_policy_loss(x, old, reference, advantages, weights,
                                                 kl_weight=beta, clip_epsilon=epsilon)
  sums = loss(log_probs, old)
  lp, old_, ref, adv, w = map(lambda x: np.asarray(x, np.float64),
                              (log_probs, old, reference, advantages, weights))
  kl = np.exp(ref - lp) - (ref - lp) - 1
  ratio = np.exp(lp - old_)
  # PPO's surrogate holds a token once its ratio is past the clip in its advantage's way.
  held = ((ratio > 1 + epsilon) & (adv > 0)) | ((ratio < 1 - epsilon) & (adv < 0))
  surrogate = np.where(held, np.clip(ratio, 1 - epsilon, 1 + epsilon), ratio) * adv
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


def test_grpo_jsonl_examples_keep_every_field_for_the_reward(tmp_path):
  path = tmp_path / 'prompts.jsonl'
  path.write_text('{"prompt": "2 + 3 =", "answer": 5}\n{"answer": "1"}\n')
  config = ml_collections.ConfigDict(dict(source='jsonl', path=str(path), bad_records='error'))
  with pytest.raises(ConfigError, match=r"prompts.jsonl:2 has no field 'prompt'"):
    objectives.OBJECTIVES['grpo'].source(config)
  config.bad_records = 'skip'
  source = objectives.OBJECTIVES['grpo'].source(config)
  assert len(source) == 1 and source[0] == [{'prompt': '2 + 3 =', 'answer': '5'}]


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


def test_rollout_rows_are_prompt_then_completion_with_group_advantages(monkeypatch):
  model, params = init_model(small_model_config(vocab_size=TOKENIZER.vocab_size), length=8)
  seen = []

  def reward(example, completion, finished):  # Records its calls; rewards length.
    seen.append((example, completion, finished))
    return float(len(completion))

  monkeypatch.setitem(rewards.REWARDS, 'recorded', reward)
  make = grpo.Rollouts(model, TOKENIZER, grpo_config(reward='recorded', max_new_tokens=40),
                           seq_len=64)
  prompts = prompt_batch(batch_size=4)
  batch, metrics = make(params, prompts, jax.random.key(3))
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
  model, params = init_model(small_model_config(vocab_size=TOKENIZER.vocab_size), length=8)
  batch, _ = grpo.Rollouts(model, TOKENIZER, grpo_config(reward='python_function'),
                               seq_len=48)(params, prompt_batch(), jax.random.key(0))
  # Rewards are all 0 here: give the rows advantages of their own.
  batch['advantages'] = np.repeat(np.linspace(-1.5, 1.5, 8, dtype=np.float32)[:, None], 48, 1)
  batch = jax.tree.map(jnp.asarray, batch)
  config = train_config(temperature=0.8)
  loss = jax.jit(functools.partial(grpo.grpo_loss, model=model, settings=config.grpo))
  _, sums, count = loss(params, batch, params)
  assert sums['kl'] == 0 and count == batch['loss_mask'].sum()

  def weighted_log_likelihood(params):  # Token by token, at the sampling temperature.
    logits = model.apply({'params': params}, batch['tokens'], batch['segment_ids'],
                         batch['positions'])
    log_probs = jax.nn.log_softmax(logits / 0.8)[:, :-1]  # Position t - 1 predicts t.
    chosen = jnp.take_along_axis(log_probs, batch['tokens'][:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(batch['advantages'][:, :1] * batch['loss_mask'][:, 1:] * chosen)
  grads = jax.jit(jax.grad(lambda p: loss(p, batch, params)[0]))(params)
  want = jax.tree.map(jnp.negative, jax.jit(jax.grad(weighted_log_likelihood))(params))
  # Two float32 sums over 8 rows in different orders: seen 2.4e-6 apart where 1e-2.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, want)

  # A first update with the sampler's log-probs, as when a rollout serves several: they
  # are the policy's own (micro-batched here), so the same gradient and nothing clipped.
  in_halves = constant_rate_train_config(objective='grpo', grpo=config.grpo,
                                         grad_accumulation_steps=2)
  batch['old_log_probs'] = grpo.sampling_log_probs(params, batch, model=model,
                                                    train_config=in_halves)
  assert loss(params, batch, params)[1]['clipped'] == 0
  grads = jax.jit(jax.grad(lambda p: loss(p, batch, params)[0]))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, want)


def letters(example, completion, finished):
  """A reward a random model can learn fast: the share of ten letters among 12 bytes."""
  return sum(c in 'abcdefghij' for c in completion) / 12


@pytest.mark.parametrize('updates_per_rollout', [1, 2])
def test_grpo_steps_raise_the_reward(updates_per_rollout, monkeypatch):
  monkeypatch.setitem(rewards.REWARDS, 'letters', letters)
  model, params = init_model(small_model_config(vocab_size=TOKENIZER.vocab_size), length=8)
  config = train_config(reward='letters', group_size=8, max_new_tokens=12, temperature=1.0,
                        kl_weight=0.0, updates_per_rollout=updates_per_rollout)
  make = grpo.Rollouts(model, TOKENIZER, config.grpo, seq_len=32)
  optimizer = optimizer_lib.make_optimizer(config)
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer,
                                   objective=objectives.OBJECTIVES['grpo'],
                                   settings=config.grpo))
  sampling_log_probs = jax.jit(functools.partial(grpo.sampling_log_probs, model=model,
                                                 train_config=config))
  reference = jax.tree.map(jnp.copy, params)
  prompts = prompt_batch(batch_size=4, seq_len=20)
  history, clipped = [], []
  for index in range(20):
    batch, metrics = make(state.params, prompts, jax.random.key(index))
    batch = jax.tree.map(jnp.asarray, batch)
    if updates_per_rollout > 1:
      batch['old_log_probs'] = sampling_log_probs(state.params, batch)
    for _ in range(updates_per_rollout):
      state, step_metrics = step(state, batch, steps.Frozen(reference=reference))
      clipped.append(float(step_metrics.get('clipped', 0.0)))
    history.append(metrics['reward'])
  # Ten letters of the 259 byte ids at the start; mostly letters after.
  assert np.mean(history[:3]) < 0.1 and np.mean(history[-3:]) > 0.6
  # At lr 1e-2 one update moves many tokens past the clip; the first update cannot.
  assert clipped[::updates_per_rollout] == [0.0] * len(history)
  assert (max(clipped) > 0) == (updates_per_rollout > 1)


@pytest.fixture(scope='module')
def letters_reward():
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(rewards.REWARDS, 'letters', letters)
    yield


def letters_run_config(workdir, mesh, updates_per_rollout=1):
  config = post_training_config(grpo_config_module, workdir, num_steps=4, log_every=1,
                                learning_rate=1e-3)
  config.train.grpo.update(reward='letters', updates_per_rollout=updates_per_rollout)
  config.data.batch_size = 4
  config.mesh.update(mesh)
  return config


@pytest.fixture(scope='module')
def one_device_run(letters_reward, pretrained, tmp_path_factory):
  """Four GRPO steps on one device, one update per rollout: (workdir, history, state)."""
  workdir = tmp_path_factory.mktemp('grpo') / 'run'
  config = letters_run_config(pretrained[0], dict(data=1, fsdp=1, tensor=1))
  return (workdir, *loop.train(config, str(workdir), jax.devices()[:1]))


COMPARED = ('step', 'loss', 'kl', 'reward', 'finished', 'eval_reward', 'eval_loss')


def test_an_interrupted_grpo_run_resumes_exactly(one_device_run, pretrained, tmp_path):
  workdir, history, state = one_device_run
  # As if stopped after step 2's checkpoint: a resumed run samples and steps the same.
  shutil.copytree(workdir, tmp_path / 'run')
  shutil.rmtree(tmp_path / 'run' / 'checkpoints' / '4')
  config = letters_run_config(pretrained[0], dict(data=1, fsdp=1, tensor=1))
  resumed_history, resumed_state = loop.train(config, str(tmp_path / 'run'), jax.devices()[:1])
  jax.tree.map(np.testing.assert_array_equal, resumed_state.params, state.params)
  rows = [{name: row.get(name) for name in COMPARED} for row in history]
  assert [{name: row.get(name) for name in COMPARED} for row in resumed_history] == rows[2:]
  assert 0 < rows[0]['reward'] and rows[0]['loss'] != rows[3]['loss']


def test_grpo_on_a_data_and_fsdp_mesh_matches_one_device(one_device_run, pretrained,
                                                         tmp_path):
  _, history, state = one_device_run
  config = letters_run_config(pretrained[0], dict(data=2, fsdp=2, tensor=1))
  mesh_history, mesh_state = loop.train(config, str(tmp_path), jax.devices()[:4])
  # The same completions (the rewards are equal), then the same steps up to float sums.
  for got, want in zip(mesh_history, history, strict=True):
    assert got['reward'] == want['reward'] and got['finished'] == want['finished']
    np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               mesh_state.params, state.params)
  kernel = mesh_state.params['layer_0']['mlp']['wi_gate']['kernel']  # [embed 64, mlp 128]
  assert kernel.addressable_shards[0].data.shape == (32, 128)


def test_a_stop_between_two_updates_on_a_rollout_saves_after_the_second(
    letters_reward, pretrained, tmp_path, monkeypatch):
  config = letters_run_config(pretrained[0], dict(data=1, fsdp=1, tensor=1),
                              updates_per_rollout=2)
  _, whole_state = loop.train(config, str(tmp_path / 'whole'), jax.devices()[:1])

  advance = logger_lib.MetricLogger.advance
  def ctrl_c_after_step_1(self, step):  # The loop's own SIGINT handler takes it.
    advance(self, step)
    if step == 1:
      os.kill(os.getpid(), signal.SIGINT)
  monkeypatch.setattr(logger_lib.MetricLogger, 'advance', ctrl_c_after_step_1)
  stopped_history, _ = loop.train(config, str(tmp_path / 'run'), jax.devices()[:1])
  monkeypatch.undo()
  # Step 1 left the rollout half used, and a checkpoint holds none: the run went on.
  assert stopped_history[-1]['step'] == 2
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['2']
  # Two updates on the rollout of step 3, the second clipped where the first moved far.
  resumed_history, resumed_state = loop.train(config, str(tmp_path / 'run'),
                                              jax.devices()[:1])
  assert [row['step'] for row in resumed_history] == [3, 4]
  assert resumed_history[0]['reward'] == resumed_history[1]['reward']
  assert resumed_history[0]['clipped'] == 0 < resumed_history[1]['clipped']
  jax.tree.map(np.testing.assert_array_equal, resumed_state.params, whole_state.params)


@pytest.mark.parametrize('field, value, message', [
    ('reward', 'unknown', r"config.train.grpo.reward='unknown' is not one of"),
    ('group_size', 1, r'config.train.grpo.group_size=1 must be an integer >= 2'),
    ('max_new_tokens', 256, r'config.train.grpo.max_new_tokens=256 must be an integer >= 1'
                            r' and < 256 \(config.data.seq_len'),
    ('clip_epsilon', 0.0, r'config.train.grpo.clip_epsilon=0.0 must be a finite number > 0'),
    ('updates_per_rollout', 3, r'config.checkpoint.every_steps=2 must be a multiple of'
                               r' config.train.grpo.updates_per_rollout=3'),
])
def test_bad_grpo_settings_are_refused_by_name(field, value, message, pretrained, tmp_path):
  config = post_training_config(grpo_config_module, pretrained[0])
  config.train.grpo[field] = value
  with pytest.raises(ConfigError, match=message):
    loop.train(config, str(tmp_path), jax.devices()[:1])
