"""Distillation runs (lm/objectives/distill.py): a student half a teacher's width learns
its distributions on text, through the loop; on prompts and responses with on-policy
batches and a top-k teacher; and a teacher that is not a language model of the student's
tokenizer is refused before anything is written. The losses against their formulas are
in tests/unit/test_distill.py."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from experiments.configs import distill as distill_config
from lm.errors import ConfigError
from lm.objectives import distill
from lm.training import checkpointing, loop, start as start_lib

from helpers import OtherTokenizer

DEVICES = jax.devices()[:1]


def student_config(teacher_workdir, data_config, **distill):
  config = distill_config.get_config('tiny')
  config.model.update(dtype='float32', embed_dim=32, mlp_dim=64)  # Half the teacher's.
  config.data.update(data_config.to_dict())
  config.train.update(num_steps=12, warmup_steps=2, learning_rate=2e-2, log_every=1,
                      eval_every=12, eval_steps=2, sample_tokens=0)
  config.train.distill.update(teacher=teacher_workdir, **distill)
  config.checkpoint.every_steps = 12
  return config


def test_a_student_learns_the_teachers_distributions_on_text(pretrained, pretrained_config,
                                                             tmp_path):
  config = student_config(pretrained[0], pretrained_config.data, divergence='jsd',
                          beta=0.5, temperature=1.0, token_loss_weight=0.1)
  history, state = loop.train(config, str(tmp_path), DEVICES)
  divergences = [row['divergence'] for row in history if 'divergence' in row]
  assert divergences[-1] < 0.8 * divergences[0]  # Of a teacher a smaller student cannot fit whole.
  assert {'eval_loss', 'eval_divergence', 'eval_token_loss'} <= set(history[-1])
  np.testing.assert_allclose(history[-1]['loss'], history[-1]['divergence']
                             + 0.1 * history[-1]['token_loss'], rtol=1e-5)
  # The student's checkpoint holds the student alone, at its own width.
  restored = checkpointing.restore_for_inference(str(tmp_path))
  assert restored.params['embed']['embedding'].shape[-1] == 32
  assert jax.tree.structure(restored.params) == jax.tree.structure(state.params)


def write_examples(path, count: int = 48) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    for index in range(count):
      f.write(json.dumps({'prompt': f'Count {index}:', 'response': f' {index + 1}.'}) + '\n')
  return str(path)


def test_on_policy_batches_are_the_students_samples_scored_by_a_top_k_teacher(
    pretrained, pretrained_config, tmp_path):
  data = ml_collections.ConfigDict(pretrained_config.data.to_dict())
  data.update(source='jsonl', path=write_examples(tmp_path / 'examples.jsonl'), seq_len=32,
              validation_fraction=0.25)
  config = student_config(pretrained[0], data, data='examples', on_policy_fraction=0.5,
                          max_new_tokens=8, top_k=16, divergence='reverse_kl')
  history, _ = loop.train(config, str(tmp_path / 'run'), DEVICES)
  logged = [row for row in history if 'on_policy' in row]
  assert len(logged) == 12
  assert [row['on_policy'] for row in logged] == [
      float(distill.on_policy(config.seed, step, 0.5)) for step in range(12)]
  for row in logged:  # A sampled batch reports its completions, a data batch none.
    assert ('sampled_tokens_per_second' in row) == bool(row['on_policy'])
    assert np.isfinite(row['divergence']) and row['divergence'] >= 0


@pytest.mark.parametrize('case', ['other tokenizer', 'no checkpoints', 'empty'])
def test_a_teacher_that_is_not_a_language_model_of_the_students_tokens_is_refused(
    case, pretrained, pretrained_config, tmp_path):
  field = 'config.train.distill.teacher'
  if case == 'other tokenizer':
    with pytest.raises(ConfigError, match=f'{field}=.* reads the ids of a byte tokenizer of'
                       r' 259 ids, and this run a different sentencepiece tokenizer of 290'
                       r' ids \(config.tokenizer\): they must share one'):
      start_lib.check_model_read(pretrained[0], field, 'lm', OtherTokenizer())
    return
  teacher = str(tmp_path / 'nothing') if case == 'no checkpoints' else ''
  config = student_config(teacher, pretrained_config.data)
  match = f'{field}=.*nothing: no checkpoints' if teacher else f'{field} is empty'
  with pytest.raises(ConfigError, match=match):
    loop.train(config, str(tmp_path / 'run'), DEVICES)
  assert not os.path.exists(tmp_path / 'run')


def saved_logits_flags(teacher, data_path, **distill_fields) -> list[str]:
  """The command line of `saved_logits_config`'s run."""
  flags = ['--config=experiments/configs/distill.py:tiny', '--config.model.dtype=float32',
           '--config.model.embed_dim=32', '--config.model.mlp_dim=64',
           '--config.data.source=text', f'--config.data.path={data_path}',
           '--config.data.validation_fraction=0.25', '--config.train.num_steps=6',
           '--config.train.eval_every=6', '--config.train.eval_steps=2',
           '--config.train.sample_tokens=0', '--config.checkpoint.every_steps=6',
           f'--config.train.distill.teacher={teacher}', '--config.train.distill.top_k=8']
  return flags + [f'--config.train.distill.{name}={value}'
                  for name, value in distill_fields.items()]


def saved_logits_config(teacher, data_path, **distill_fields):
  config = distill_config.get_config('tiny')
  config.model.update(dtype='float32', embed_dim=32, mlp_dim=64)
  config.data.update(source='text', path=data_path, validation_fraction=0.25)
  config.train.update(num_steps=6, eval_every=6, eval_steps=2, sample_tokens=0)
  config.checkpoint.every_steps = 6
  config.train.distill.update(teacher=teacher, top_k=8, **distill_fields)
  return config


def test_teacher_logits_saved_once_train_the_student_as_the_teacher_run_does(
    pretrained, pretrained_config, commands, tmp_path):
  teacher, data_path = pretrained[0], pretrained_config.data.path
  saved = str(tmp_path / 'logits')
  result = commands('experiments.distill_logits', f'--output={saved}',
                    *saved_logits_flags(teacher, data_path))
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(os.listdir(os.path.join(saved, 'train'))) == 6
  live_history, live = loop.train(saved_logits_config(teacher, data_path),
                                  str(tmp_path / 'live'), DEVICES)
  read_history, read = loop.train(
      saved_logits_config('', data_path, teacher_logits=saved), str(tmp_path / 'read'), DEVICES)
  for live_row, read_row in zip(live_history, read_history):
    np.testing.assert_allclose(read_row['divergence'], live_row['divergence'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               read.params, live.params)
  # Saved for other batches (another seed), or too few of them: refused before a write.
  other = saved_logits_config('', data_path, teacher_logits=saved)
  other.seed = 1
  with pytest.raises(ConfigError, match=r'teacher_logits=.* was written for seed=0, and this'
                     ' run has 1: the saved logits are of other batches'):
    loop.train(other, str(tmp_path / 'other'), DEVICES)
  longer = saved_logits_config('', data_path, teacher_logits=saved)
  longer.train.num_steps = 8
  with pytest.raises(ConfigError, match='holds 6 batches for num_steps, fewer than'
                     r' config.train.num_steps=8'):
    loop.train(longer, str(tmp_path / 'longer'), DEVICES)
  assert not os.path.exists(tmp_path / 'other') and not os.path.exists(tmp_path / 'longer')
