"""PPO that learns a toy reward through the whole loop, resumes exactly between rollouts,
and serves each rollout's epochs of mini-batches; its formulas are in tests/unit/
test_ppo.py."""

import os
import signal

import jax
import numpy as np
import pytest

from experiments.configs import ppo as ppo_config_module
from lm.errors import ConfigError
from lm.objectives import rewards
from lm.training import checkpointing, logger as logger_lib, loop

from helpers import post_training_config

DEVICES = jax.devices()[:1]


def letters(example, completion, finished):
  """A reward a random model can learn fast: the share of 13 letters among 12 bytes."""
  del example, finished
  return sum(c in 'abcdefghijklm' for c in completion) / 12


@pytest.fixture(scope='module', autouse=True)
def letters_reward():
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(rewards.REWARDS, 'letters', letters)
    yield


def ppo_config(pretrained_workdir, **train):
  config = post_training_config(ppo_config_module, pretrained_workdir, **{
      'num_steps': 96, 'warmup_steps': 0, 'final_learning_rate_ratio': 1.0,
      'weight_decay': 0.0, 'learning_rate': 3e-3, 'log_every': 4, 'eval_every': 96,
      'eval_steps': 1, **train})
  config.train.ppo.update(reward='letters', max_new_tokens=12, kl_weight=0.0, epochs=2,
                          minibatches=2)
  config.data.update(batch_size=16, seq_len=64)
  config.checkpoint.every_steps = 8
  return config


@pytest.fixture(scope='module')
def ppo_run(pretrained, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ppo') / 'run')
  return (workdir, *loop.train(ppo_config(pretrained[0]), workdir, DEVICES))


def test_ppo_raises_a_toy_reward(ppo_run):
  _, history, _ = ppo_run
  rewards_by_step = [row['reward'] for row in history]  # A rollout's mean, every 4 steps.
  # Few of those letters at the start; mostly letters at the end, sampled and greedy.
  # (When the rise comes varies with the CPU's arithmetic: from step 44 to 84 of 96 seen;
  # the last rollout's mean, sampled, from 0.79 to 1.0.)
  assert np.mean(rewards_by_step[:2]) < 0.15 and rewards_by_step[-1] > 0.6, rewards_by_step
  assert history[-1]['eval_reward'] > 0.8 and history[-1]['value_loss'] >= 0


def short_config(pretrained_workdir):
  return ppo_config(pretrained_workdir, num_steps=12, eval_every=12)


@pytest.fixture(scope='module')
def short_run(pretrained, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ppo_short') / 'run')
  return loop.train(short_config(pretrained[0]), workdir, DEVICES)


def test_an_interrupted_ppo_run_resumes_exactly_from_a_checkpoint_between_rollouts(
    short_run, pretrained, tmp_path):
  history, state = short_run
  advance = logger_lib.MetricLogger.advance
  def ctrl_c_at_step_5(self, step):  # Mid-rollout: the loop stops after the rollout's last.
    advance(self, step)
    if step == 5:
      os.kill(os.getpid(), signal.SIGINT)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(logger_lib.MetricLogger, 'advance', ctrl_c_at_step_5)
    stopped, _ = loop.train(short_config(pretrained[0]), str(tmp_path), DEVICES)
  assert stopped[-1]['step'] == 8 and sorted(os.listdir(tmp_path / 'checkpoints')) == ['8']
  resumed, resumed_state = loop.train(short_config(pretrained[0]), str(tmp_path), DEVICES)
  # The policy, its value head and the optimizer's state: all as if never stopped.
  jax.tree.map(np.testing.assert_array_equal, resumed_state.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, resumed_state.opt_state, state.opt_state)
  compared = ('step', 'loss', 'reward', 'value_loss', 'clipped', 'eval_reward')
  assert ([{name: row.get(name) for name in compared} for row in resumed]
          == [{name: row.get(name) for name in compared} for row in history[2:]])
  # Another critic is another tree of params: refused, and the checkpoints stay.
  config = short_config(pretrained[0])
  config.train.ppo.critic = 'model'
  with pytest.raises(ConfigError, match=r"model.head: checkpoint has 'lm_value', config has"
                     r" 'lm_critic' \(set by the objective: config.train.ppo.critic for PPO\)"):
    loop.train(config, str(tmp_path), DEVICES)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['12', '8']
  # The policy reads as a language model; its critic is the 'value_head' entry beside it.
  assert 'value_head' in state.params
  policy = checkpointing.restore_for_inference(str(tmp_path))
  assert 'value_head' not in policy.params and policy.config.model.head == 'lm'
