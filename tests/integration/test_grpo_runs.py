"""GRPO that learns: steps by hand, and runs that resume exactly (after a stop between two
updates on one rollout too), shard over a mesh as on one device, and refuse bad settings
by name. Its loss, rewards and rollouts: tests/unit/test_grpo.py."""

import functools
import os
import signal

import jax
import jax.numpy as jnp
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


def letters(example, completion, finished):
  """A reward a random model can learn fast: the share of ten letters among 12 bytes."""
  return sum(c in 'abcdefghij' for c in completion) / 12


def prompt_batch(batch_size, seq_len):
  return next(iter(pipeline.make_dataset(PROMPTS, objectives.OBJECTIVES['grpo'], TOKENIZER,
                                         seq_len=seq_len, batch_size=batch_size, seed=0,
                                         train=False)))


def train_config(**grpo_settings):
  settings = grpo.default_config()
  settings.update(reward='python_function', group_size=4, max_new_tokens=24, temperature=0.8,
                  kl_weight=0.1)
  settings.update(grpo_settings)
  return constant_rate_train_config(objective='grpo', grpo=settings, learning_rate=1e-2,
                                    num_steps=100)


@pytest.mark.parametrize('updates_per_rollout, family', [
    (1, {}), (2, {}),
    # RLOO's baseline, GRPO's per-sequence mean and DAPO's clip-higher.
    (2, dict(advantage='rloo', aggregation='sequence_mean', clip_epsilon_high=0.28)),
    # Dr. GRPO's advantage and constant divisor, with GSPO's sequence ratio.
    (2, dict(advantage='dr_grpo', aggregation='constant', ratio='sequence'))])
def test_grpo_steps_raise_the_reward(updates_per_rollout, family, monkeypatch):
  monkeypatch.setitem(rewards.REWARDS, 'letters', letters)
  model, params = init_model(small_model_config(vocab_size=TOKENIZER.vocab_size), length=8)
  config = train_config(reward='letters', group_size=8, max_new_tokens=12, temperature=1.0,
                        kl_weight=0.0, updates_per_rollout=updates_per_rollout, **family)
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


def letters_run_config(workdir, mesh, updates_per_rollout=2):
  config = post_training_config(grpo_config_module, workdir, num_steps=4, log_every=1,
                                learning_rate=1e-3)
  # Dynamic sampling too: a refill reads further prompts, which a resume must not repeat.
  config.train.grpo.update(reward='letters', updates_per_rollout=updates_per_rollout,
                           dynamic_sampling_rounds=2)
  config.data.batch_size = 4
  config.mesh.update(mesh)
  return config


ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)


@pytest.fixture(scope='module')
def one_device_run(letters_reward, pretrained, tmp_path_factory):
  """Four GRPO steps on one device, two updates per rollout: (workdir, history, state)."""
  workdir = tmp_path_factory.mktemp('grpo') / 'run'
  config = letters_run_config(pretrained[0], ONE_DEVICE)
  return (workdir, *loop.train(config, str(workdir), jax.devices()[:1]))


@pytest.fixture(scope='module')
def stopped_run(letters_reward, pretrained, tmp_path_factory):
  """The run of `one_device_run`, stopped by a Ctrl-C after step 1, then resumed:
  {'workdir', 'stopped_history', 'checkpoints' (after the stop), 'resumed_history',
  'resumed_state'}."""
  config = letters_run_config(pretrained[0], ONE_DEVICE)
  workdir = tmp_path_factory.mktemp('grpo_stopped') / 'run'
  advance = logger_lib.MetricLogger.advance
  def ctrl_c_after_step_1(self, step):  # The loop's own SIGINT handler takes it.
    advance(self, step)
    if step == 1:
      os.kill(os.getpid(), signal.SIGINT)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(logger_lib.MetricLogger, 'advance', ctrl_c_after_step_1)
    stopped_history, _ = loop.train(config, str(workdir), jax.devices()[:1])
  checkpoints = sorted(os.listdir(workdir / 'checkpoints'))
  resumed_history, resumed_state = loop.train(config, str(workdir), jax.devices()[:1])
  return dict(workdir=workdir, stopped_history=stopped_history, checkpoints=checkpoints,
              resumed_history=resumed_history, resumed_state=resumed_state)


COMPARED = ('step', 'loss', 'kl', 'reward', 'finished', 'eval_reward', 'eval_loss',
            'informative_groups', 'sampling_rounds')


def test_an_interrupted_grpo_run_resumes_exactly(one_device_run, stopped_run):
  _, history, state = one_device_run
  # Stopped after step 2's checkpoint: the resumed run samples and steps the same.
  resumed_history = stopped_run['resumed_history']
  jax.tree.map(np.testing.assert_array_equal, stopped_run['resumed_state'].params,
               state.params)
  rows = [{name: row.get(name) for name in COMPARED} for row in history]
  assert [{name: row.get(name) for name in COMPARED} for row in resumed_history] == rows[2:]
  assert 0 < rows[0]['reward'] and rows[0]['loss'] != rows[3]['loss']
  assert max(row['sampling_rounds'] for row in rows) > 1  # Some groups were replaced.


def test_grpo_on_a_data_and_fsdp_mesh_matches_one_device(one_device_run, pretrained,
                                                         tmp_path):
  _, history, state = one_device_run
  config = letters_run_config(pretrained[0], dict(data=2, fsdp=2, tensor=1))
  mesh_history, mesh_state = loop.train(config, str(tmp_path), jax.devices()[:4])
  # The same completions (the rewards are equal), then the same steps up to float sums.
  for got, want in zip(mesh_history, history, strict=True):
    assert got['reward'] == want['reward'] and got['finished'] == want['finished']
    np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-5, atol=1e-7)
  # Adam divides by sqrt(v): where a gradient is near zero, float-sum differences move the
  # update by a fraction of the learning rate (1e-3), so parameters agree to 1e-4.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               mesh_state.params, state.params)
  kernel = mesh_state.params['layer_0']['mlp']['wi_gate']['kernel']  # [embed 64, mlp 128]
  assert kernel.addressable_shards[0].data.shape == (32, 128)


def test_a_stop_between_two_updates_on_a_rollout_saves_after_the_second(one_device_run,
                                                                        stopped_run):
  _, _, whole_state = one_device_run
  # Step 1 left the rollout half used, and a checkpoint holds none: the run went on.
  assert stopped_run['stopped_history'][-1]['step'] == 2
  assert stopped_run['checkpoints'] == ['2']
  # Two updates on the rollout of step 3, the second clipped where the first moved far.
  resumed_history = stopped_run['resumed_history']
  assert [row['step'] for row in resumed_history] == [3, 4]
  assert resumed_history[0]['reward'] == resumed_history[1]['reward']
  assert resumed_history[0]['clipped'] == 0 < resumed_history[1]['clipped']
  jax.tree.map(np.testing.assert_array_equal, stopped_run['resumed_state'].params,
               whole_state.params)


@pytest.mark.parametrize('field, value, message', [
    ('reward', 'unknown', r"config.train.grpo.reward='unknown' is not one of"),
    ('group_size', 1, r'config.train.grpo.group_size=1 must be an integer >= 2'),
    ('max_new_tokens', 256, r'config.train.grpo.max_new_tokens=256 must be an integer >= 1'
                            r' and < 256 \(config.data.seq_len'),
    ('clip_epsilon', 0.0, r'config.train.grpo.clip_epsilon=0.0 must be a finite number > 0'),
    ('clip_epsilon_high', -0.1, r'config.train.grpo.clip_epsilon_high=-0.1 must be a finite'
                                r' number >= 0'),
    ('advantage', 'ppo', r"config.train.grpo.advantage='ppo' is not one of \['dr_grpo',"),
    ('aggregation', 'sum', r"config.train.grpo.aggregation='sum' is not one of"),
    ('ratio', 'seq', r"config.train.grpo.ratio='seq' is not one of \['token', 'sequence'\]"),
    ('dynamic_sampling_rounds', -1, r'config.train.grpo.dynamic_sampling_rounds=-1 must be'),
    ('updates_per_rollout', 3, r'config.checkpoint.every_steps=2 must be a multiple of'
                               r' config.train.grpo.updates_per_rollout=3'),
])
def test_bad_grpo_settings_are_refused_by_name(field, value, message, pretrained, tmp_path):
  config = post_training_config(grpo_config_module, pretrained[0])
  config.train.grpo[field] = value
  with pytest.raises(ConfigError, match=message):
    loop.train(config, str(tmp_path), jax.devices()[:1])
