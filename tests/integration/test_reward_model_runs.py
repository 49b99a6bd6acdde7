"""Reward-model runs (lm/objectives/reward_model.py): one learns a toy preference from a
pretrained trunk under a fresh head, resumes exactly, trains through LoRA, and is refused
where a language model is read; the loss against its formula is in
tests/unit/test_reward_model.py."""

import json
import os
import random
import signal

import jax
import numpy as np
import pytest

from experiments.configs import grpo as grpo_config, reward_model as reward_model_config
from lm.errors import ConfigError
from lm.training import checkpointing, logger as logger_lib, loop

from helpers import post_training_config

DEVICES = jax.devices()[:1]


def write_pairs(path, num_pairs: int = 160, seed: int = 0) -> str:
  """A preference a reward model can learn and a coin cannot: digits over letters."""
  rng = random.Random(seed)
  with open(path, 'w', encoding='utf-8') as f:
    for index in range(num_pairs):
      chosen = ' ' + ''.join(rng.choice('0123456789') for _ in range(rng.randint(4, 10)))
      rejected = ' ' + ''.join(rng.choice('abcdefghij') for _ in range(rng.randint(4, 10)))
      f.write(json.dumps({'prompt': f'Item {index}:', 'chosen': chosen,
                          'rejected': rejected}) + '\n')
  return str(path)


def reward_config(pretrained_workdir, pairs_path, **train):
  config = post_training_config(reward_model_config, pretrained_workdir, **{
      'num_steps': 12, 'warmup_steps': 2, 'learning_rate': 3e-3, 'log_every': 1,
      'eval_every': 12, 'eval_steps': 4, **train})
  config.data.update(source='jsonl', path=pairs_path, seq_len=32, batch_size=8)
  config.checkpoint.every_steps = 6
  return config


@pytest.fixture(scope='module')
def pairs(tmp_path_factory):
  return write_pairs(tmp_path_factory.mktemp('pairs') / 'pairs.jsonl')


@pytest.fixture(scope='module')
def reward_run(pretrained, pairs, tmp_path_factory):
  """(workdir, history, state) of 12 steps from the pretrained run."""
  workdir = str(tmp_path_factory.mktemp('reward') / 'run')
  return (workdir, *loop.train(reward_config(pretrained[0], pairs), workdir, DEVICES))


def test_a_reward_model_learns_a_preference_from_a_pretrained_trunk(reward_run, pretrained):
  workdir, history, state = reward_run
  rows = {row['step']: row for row in history}
  # A fresh head scores both sides alike: the loss starts near log 2.
  assert abs(rows[1]['loss'] - np.log(2)) < 0.1 and abs(rows[1]['margin']) < 0.5
  assert rows[12]['eval_accuracy'] == 1.0 and rows[12]['eval_margin'] > 3
  assert rows[12]['loss'] < 0.1
  # The trunk started as the pretrained run's, the head fresh; no logits are kept.
  restored = checkpointing.restore_for_inference(workdir, head='score')
  assert 'score' in restored.params and 'lm_head' not in restored.params
  assert restored.config.model.head == 'score'
  assert not os.path.exists(os.path.join(workdir, 'reference'))


def test_an_interrupted_reward_model_run_resumes_exactly(reward_run, pretrained, pairs,
                                                          tmp_path):
  _, history, state = reward_run
  config = reward_config(pretrained[0], pairs)
  advance = logger_lib.MetricLogger.advance
  def ctrl_c_after_step_3(self, step):  # The loop's own SIGINT handler takes it.
    advance(self, step)
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(logger_lib.MetricLogger, 'advance', ctrl_c_after_step_3)
    stopped, _ = loop.train(config, str(tmp_path), DEVICES)
  assert stopped[-1]['step'] == 3 and sorted(os.listdir(tmp_path / 'checkpoints')) == ['3']
  resumed, resumed_state = loop.train(config, str(tmp_path), DEVICES)
  jax.tree.map(np.testing.assert_array_equal, resumed_state.params, state.params)
  compared = ('step', 'loss', 'accuracy', 'margin', 'eval_accuracy', 'eval_loss')
  assert ([{name: row.get(name) for name in compared} for row in resumed]
          == [{name: row.get(name) for name in compared} for row in history[3:]])


def test_a_reward_model_trains_through_lora_on_its_frozen_trunk(pretrained, pairs, tmp_path):
  config = reward_config(pretrained[0], pairs)
  config.lora.update(rank=4, alpha=8.0)
  history, state = loop.train(config, str(tmp_path), DEVICES)
  rows = {row['step']: row for row in history}
  assert rows[12]['eval_accuracy'] >= 0.9 and rows[12]['loss'] < rows[1]['loss']
  assert all(name.endswith(('_lora_a', '_lora_b')) for name in
             {jax.tree_util.keystr(path[-1:], simple=True)
              for path, _ in jax.tree_util.tree_leaves_with_path(state.params)})
  # Read back as one model: the adapters folded into the trunk, under the same fresh head
  # (config.seed's, made again from the base).
  restored = checkpointing.restore_for_inference(str(tmp_path), head='score')
  assert restored.params['score']['kernel'].shape == (config.model.embed_dim, 1)


def test_a_reward_model_is_refused_where_a_language_model_is_read(reward_run, tmp_path):
  workdir = reward_run[0]
  with pytest.raises(ConfigError, match=r"--workdir=.* holds a model with model.head="
                     r"'score' \(a reward model\); this reads one with 'lm'"):
    checkpointing.restore_for_inference(workdir)
  config = post_training_config(grpo_config, workdir)
  with pytest.raises(ConfigError, match=r"config.train.init_from=.* is a model with"
                     r" model.head='score' \(a reward model\): config.train.objective='grpo'"):
    loop.train(config, str(tmp_path), DEVICES)
  assert not os.listdir(tmp_path)  # Refused before anything was written.
