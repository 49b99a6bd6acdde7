"""SFT and DPO runs that start from another run's checkpoint (tests/unit/
test_post_training.py has their data and losses), and the starts that are refused."""

import os
import shutil

import jax
import numpy as np
import pytest

from experiments.configs import dpo as dpo_config, sft as sft_config
from lm import tokenizer as tokenizer_lib
from lm.errors import ConfigError
from lm.training import checkpointing, loop

from helpers import WORDS, make_tiny_config, post_training_config

DEVICES = jax.devices()[:1]


def test_sft_starts_from_the_init_from_params(pretrained, tmp_path):
  workdir, pretrained_params = pretrained
  config = post_training_config(sft_config, workdir, num_steps=2, warmup_steps=1,
                                eval_every=2)
  config.checkpoint.every_steps = 1
  history, _ = loop.train(config, str(tmp_path), DEVICES)
  # The first step's learning rate is the warmup's zero: after it, the params are still
  # those the run started from.
  after_first = checkpointing.restore_for_inference(str(tmp_path), step=1).params
  jax.tree.map(np.testing.assert_array_equal, after_first, pretrained_params)
  assert history[-1]['eval_loss'] > 0 and history[-1]['num_tokens'] > 0


@pytest.fixture(scope='module')
def dpo_run(pretrained, tmp_path_factory):
  """A four-step DPO run from a copy of `pretrained`; then that copy's checkpoints are
  deleted (pruned by the source run, say) and the DPO run is resumed to step 6.
  {'source', 'config', 'workdir', 'history', 'resumed'}; read, never written."""
  root = tmp_path_factory.mktemp('dpo')
  source = str(root / 'pretrained')
  shutil.copytree(pretrained[0], source, ignore=shutil.ignore_patterns('lock'))
  config = post_training_config(dpo_config, source, num_steps=4, log_every=1,
                                learning_rate=1e-3)
  workdir = str(root / 'run')
  history, _ = loop.train(config, workdir, DEVICES)
  shutil.rmtree(os.path.join(source, 'checkpoints'))
  config.train.num_steps = 6
  resumed, _ = loop.train(config, workdir, DEVICES)
  return dict(source=source, config=config, workdir=workdir, history=history,
              resumed=resumed)


def test_dpo_trains_from_its_reference_and_resumes(dpo_run, tmp_path):
  rows = {row['step']: row for row in dpo_run['history']}
  np.testing.assert_allclose(rows[1]['loss'], np.log(2.0), rtol=1e-6)  # policy = reference
  assert rows[4]['loss'] != rows[1]['loss'] and 'eval_reward_accuracy' in rows[4]
  # The step init_from resolved to is recorded, so a resumed run reloads the same
  # reference even if that workdir has saved newer steps since.
  saved_config, _ = checkpointing.Checkpointer(dpo_run['workdir'], None,
                                               read_only=True).read_metadata(4)
  assert (saved_config.train.init_from == dpo_run['source']
          and saved_config.train.init_from_step == 2)
  assert [row['step'] for row in dpo_run['resumed'] if 'loss' in row] == [5, 6]
  workdir = str(tmp_path / 'run')  # A copy: the run is shared.
  shutil.copytree(dpo_run['workdir'], workdir, ignore=shutil.ignore_patterns('lock'))
  config = dpo_run['config'].copy_and_resolve_references()
  config.train.update(num_steps=8, init_from_step=1)
  with pytest.raises(ConfigError, match=r'train.init_from_step: checkpoint has 2, config has 1'):
    loop.train(config, workdir, DEVICES)


def test_dpo_resumes_after_its_init_from_checkpoint_is_gone(dpo_run, pretrained):
  # The run above resumed with the checkpoints of its init_from deleted.
  workdir, history = dpo_run['workdir'], dpo_run['resumed']
  # The reference is the run's own copy of the params it started from.
  reference = checkpointing.restore_reference(workdir, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pretrained[1]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(reference),
               jax.device_get(pretrained[1]))
  assert [row['step'] for row in history if 'loss' in row] == [5, 6]


@pytest.mark.parametrize('case', ['no checkpoints', 'no such step', 'other model',
                                  'other objective'])
def test_bad_post_training_starts_are_refused_by_name(case, pretrained, tmp_path):
  workdir, _ = pretrained
  config = post_training_config(sft_config, workdir)
  if case == 'no checkpoints':
    config.train.init_from = str(tmp_path / 'nothing')
    message = r'config.train.init_from=.*nothing.*: no checkpoints'
  elif case == 'no such step':
    config.train.init_from_step = 7
    message = r'config.train.init_from_step=7: .*checkpoints has steps \[2\]'
  elif case == 'other model':
    config.model.num_layers = 3
    message = r'model.num_layers: checkpoint has 2, config has 3'
  else:  # Resuming a pretraining workdir (a copy: the run is shared) as SFT.
    config.train.init_from = ''
    message = r"train.objective: checkpoint has 'pretrain', config has 'sft'"
    tmp_path = shutil.copytree(workdir, tmp_path / 'pretrained',
                               ignore=shutil.ignore_patterns('lock'))
  with pytest.raises(ConfigError, match=message):
    loop.train(config, str(tmp_path), DEVICES)


def test_init_from_refuses_a_different_tokenizer_of_the_same_vocabulary_size(tmp_path):
  """Two sentencepiece models of 290 pieces trained on different text: the same model
  shapes, other ids for the same text. Post-training must not start from the checkpoint
  with the other one."""
  paths = [str(tmp_path / 'prose.model'), str(tmp_path / 'code.model')]
  prose = tokenizer_lib.train_sentencepiece([' '.join(WORDS) + '.\n'] * 50, 290, paths[0])
  code = tokenizer_lib.train_sentencepiece(['def f(x):\n    return x\n'] * 50, 290, paths[1])
  assert prose.vocab_size == code.vocab_size and prose.to_dict() != code.to_dict()
  config = make_tiny_config(tmp_path / 'corpus')
  config.tokenizer.update(kind='sentencepiece', path=paths[0])
  config.model.vocab_size = 296
  config.train.update(num_steps=1, warmup_steps=0, eval_every=1)
  workdir = str(tmp_path / 'pretrained')
  loop.train(config, workdir, DEVICES)

  config = post_training_config(sft_config, workdir, num_steps=1, warmup_steps=0)
  config.tokenizer.update(kind='sentencepiece', path=paths[1])
  config.model.vocab_size = 296
  with pytest.raises(ConfigError, match=r'tokenizer mismatch: the checkpoint in'
                                        r' .*pretrained/checkpoints/1 .*\(config.tokenizer\)'):
    loop.train(config, str(tmp_path / 'sft'), DEVICES)
