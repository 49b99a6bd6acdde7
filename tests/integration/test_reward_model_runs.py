"""Reward-model runs (lm/objectives/reward_model.py): one learns a toy preference from a
pretrained trunk under a fresh head, resumes exactly, trains through LoRA, and is refused
where a language model is read; the loss against its formula is in
tests/unit/test_reward_model.py."""

import json
import os
import random
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from experiments.configs import grpo as grpo_config, ppo as ppo_config
from experiments.configs import reward_model as reward_model_config
from lm import models, sharding
from lm.data import pipeline
from lm.errors import ConfigError
from lm.evaluation import harness, scoring, tasks
from lm.objectives import grpo
from lm.training import checkpointing, logger as logger_lib, loop, start as start_lib

from helpers import OtherTokenizer, post_training_config

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


def test_a_reward_model_scores_grpo_rollouts_at_each_completions_last_token(reward_run,
                                                                            pretrained):
  workdir = reward_run[0]
  scorer = checkpointing.restore_for_inference(workdir, head='score')
  policy = checkpointing.restore_for_inference(pretrained[0])
  settings = grpo.default_config()
  settings.update(reward=f'model:{workdir}+math_format', group_size=2, max_new_tokens=8)
  rollouts = grpo.Rollouts(policy.model, policy.tokenizer, settings, seq_len=32,
                           reward_models=[(scorer.model, scorer.params)])
  prompts = {'example': np.array([json.dumps({'prompt': f'Item {i}:'}) for i in range(4)]),
             'prompt_tokens': np.zeros((4, 24), np.int32), 'prompt_length': np.zeros(4, np.int32)}
  for row in range(4):
    ids = policy.tokenizer.prompt_ids(f'Item {row}:')
    prompts['prompt_tokens'][row, :len(ids)], prompts['prompt_length'][row] = ids, len(ids)
  rows, rewards_b, _, _ = rollouts.sample(policy.params, prompts, jax.random.key(0))
  for row in range(0, 8, 2):  # Rows alone, unpadded: the score at the last token.
    length = int(rows['segment_ids'][row].sum())
    tokens = rows['tokens'][row:row + 1, :length]
    scores = scorer.model.apply({'params': scorer.params}, tokens, np.ones_like(tokens),
                                np.arange(length)[None])
    # math_format adds nothing: these completions mark no answer.
    np.testing.assert_allclose(rewards_b[row], scores[0, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('case', ['a language model', 'other tokenizer', 'no checkpoints'])
def test_a_reward_that_is_not_a_reward_model_of_the_policys_tokens_is_refused(
    case, reward_run, pretrained, tmp_path):
  field = 'config.train.grpo.reward'
  if case == 'a language model':
    with pytest.raises(ConfigError, match=f"{field}=.*pretrained.* holds a model with"
                       r" model.head='lm' \(a language model\); this reads one with 'score'"):
      checkpointing.check_reward_model(pretrained[0], field, None)
  elif case == 'other tokenizer':
    with pytest.raises(ConfigError, match=r'the reward model .* reads the ids of a byte tokenizer'
                       r' of 259 ids, and this run.s policy a different sentencepiece'
                       r' tokenizer of 290 ids \(config.tokenizer\)'):
      checkpointing.check_reward_model(reward_run[0], field, OtherTokenizer())
  else:  # Refused at the start of a run, before its workdir is made.
    config = post_training_config(grpo_config, pretrained[0])
    config.train.grpo.reward = f'math+model:{tmp_path / "nothing"}'
    with pytest.raises(ConfigError, match=f'{field}=.*nothing: no checkpoints'):
      loop.train(config, str(tmp_path / 'run'), DEVICES)
    assert not os.path.exists(tmp_path / 'run')


def test_evaluation_ranks_held_out_pairs_with_the_reward_models_own_scores(reward_run,
                                                                           pairs):
  run = checkpointing.restore_for_inference(reward_run[0], head='score')
  records = [json.loads(line) for line in open(pairs, encoding='utf-8')][:24]
  records[0]['chosen'] = 'x' * 80  # Past the context: cut at the end, as training cuts it.
  task = tasks.Task('pairs', 'pairs', records)
  scorer = scoring.RewardScorer.for_run(run, max_length=32, batch_size=5)
  samples = []
  with sharding.activate(run.mesh):
    metrics = harness.evaluate(task, scorer, samples=samples)
  assert metrics['pairs'] == 24 and metrics['truncated'] == 1 and metrics['accuracy'] > 0.9
  # Each side alone, unpadded (op by op, so a few): the cut one, and others.
  for record, sample in list(zip(records, samples))[:4]:
    for side in ('chosen', 'rejected'):
      ids = pipeline.prompt_and_response(run.tokenizer, record['prompt'], record[side])[0][:32]
      scores = run.model.apply({'params': run.params}, np.array([ids]),
                               np.ones((1, len(ids)), np.int32), np.arange(len(ids))[None])
      np.testing.assert_allclose(sample[f'{side}_reward'], scores[0, -1], rtol=1e-5,
                                 atol=1e-6)


def test_the_evaluate_command_reports_a_reward_models_accuracy_or_names_what_it_cannot_do(
    reward_run, pairs, commands, tmp_path):
  workdir = shutil.copytree(reward_run[0], tmp_path / 'run',
                            ignore=shutil.ignore_patterns('lock'))
  result = commands('experiments.evaluate', f'--workdir={workdir}', f'--task={pairs}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r'pairs\s+pairs\s+accuracy=1.0000, margin=\d', result.stdout), result.stdout
  for flag, named in (('--task=arithmetic', '--task=arithmetic holds generation records, for'
                       f' a language model; --workdir={workdir} holds a reward model'),
                      ('--num_shots=2', '--num_shots and --chat prompt a language model')):
    result = commands('experiments.evaluate', f'--workdir={workdir}', flag)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert named in result.stderr.strip().splitlines()[-1]


def test_ppos_critic_model_starts_from_a_reward_model(reward_run, pretrained, tmp_path):
  config = post_training_config(ppo_config, pretrained[0], num_steps=4, log_every=2,
                                eval_every=4)
  config.train.ppo.update(critic='model', max_new_tokens=8, critic_init=reward_run[0])
  config.data.seq_len = 64
  history, state = loop.train(config, str(tmp_path), DEVICES)
  assert np.isfinite(history[-1]['value_loss']) and 'critic' in state.params
  # The run's reference is the params it started from: the policy as pretrained, its
  # critic the reward model.
  reference = checkpointing.restore_reference(str(tmp_path), jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params))
  for name, value in pretrained[1].items():
    jax.tree.map(np.testing.assert_array_equal, reference[name], value)
  reward_params = checkpointing.restore_for_inference(reward_run[0], head='score').params
  jax.tree.map(np.testing.assert_array_equal, reference['critic'], reward_params)
  # Read as a language model, a PPO run is its policy alone.
  policy = checkpointing.restore_for_inference(str(tmp_path))
  assert sorted(policy.params) == sorted(pretrained[1])


def test_ppos_critic_model_starts_as_the_policys_trunk_under_a_fresh_head(pretrained):
  config = post_training_config(ppo_config, pretrained[0])
  config.train.ppo.critic = 'model'
  config, tokenizer = start_lib.resolve(config, 1)
  abstract = checkpointing.abstract_params(models.build(config.model),
                                           sharding.make_mesh(config.mesh, DEVICES))
  params, _ = checkpointing.load_params(pretrained[0], -1, abstract, config, tokenizer)
  assert sorted(params['critic']) == sorted({*pretrained[1], 'score'} - {'lm_head'})
  for name in params['critic']:
    if name != 'score':
      jax.tree.map(np.testing.assert_array_equal, params['critic'][name], pretrained[1][name])
      jax.tree.map(np.testing.assert_array_equal, params[name], pretrained[1][name])


def test_a_critic_from_a_reward_model_of_other_shapes_or_a_language_model_is_refused(
    reward_run, pretrained, tmp_path):
  config = post_training_config(ppo_config, pretrained[0])
  config.train.ppo.update(critic='model', critic_init=pretrained[0])
  with pytest.raises(ConfigError, match=r"config.train.ppo.critic_init=.* holds a model with"
                     r" model.head='lm' \(a language model\); this reads one with 'score'"):
    loop.train(config, str(tmp_path / 'run'), DEVICES)
  config.train.ppo.critic_init = reward_run[0]
  config.model.mlp_dim *= 2
  config.train.init_from = ''  # A policy of its own shapes, from scratch.
  with pytest.raises(ConfigError, match=r'config.train.ppo.critic_init=.*: the reward model'
                     r' does not fit the policy \(model.mlp_dim: reward model has 128, policy'
                     r' has 256\)'):
    loop.train(config, str(tmp_path / 'run'), DEVICES)
  assert not os.path.exists(tmp_path / 'run')
