"""Checkpoints that never lie: no non-finite checkpoint, one run per workdir, a corrupt
checkpoint set aside (never deleted) and the run resumed from the newest intact one, a
resumed run's data and reference its own; bad records named at start."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import dpo as dpo_config
from lm import objectives
from lm.data import sources
from lm.errors import ConfigError
from lm.training import checkpointing, loop, steps

from helpers import post_training_config, write_corpus

DEVICES = jax.devices()[:1]


def checkpoint_steps(workdir) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_a_non_finite_step_is_named_and_never_checkpointed(tiny_config, tmp_path, monkeypatch):
  original = steps.train_step
  def poisoned(state, batch, frozen, **kwargs):
    state, metrics = original(state, batch, frozen, **kwargs)
    bad = state.step == 3  # The loss of step 3, and the params after it.
    metrics['loss'] = jnp.where(bad, jnp.nan, metrics['loss'])
    state = state.replace(params=jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p),
                                              state.params))
    return state, metrics
  monkeypatch.setattr(steps, 'train_step', poisoned)
  # Logging every 10 steps: the check must not wait for a logging step.
  tiny_config.train.update(log_every=10, eval_every=10, num_steps=6, warmup_steps=1)
  tiny_config.checkpoint.every_steps = 2
  with pytest.raises(FloatingPointError,
                     match=r'at step 3; nothing from it on was saved.*last good checkpoint is'
                           r' step 2'):
    loop.train(tiny_config, str(tmp_path), DEVICES)
  assert checkpoint_steps(tmp_path) == [2]


def test_a_second_run_on_the_same_workdir_is_refused_and_a_dead_one_leaves_no_lock(
    tiny_config, tmp_path):
  tiny_config.train.update(num_steps=1, warmup_steps=0, eval_every=1)
  held = checkpointing.WorkdirLock(str(tmp_path))
  with pytest.raises(ConfigError, match=r'is in use by a running run; wait'):
    loop.train(tiny_config, str(tmp_path), DEVICES)
  assert not os.path.exists(tmp_path / 'checkpoints')
  held.release()  # As the kernel does for a killed process.
  loop.train(tiny_config, str(tmp_path), DEVICES)
  assert checkpoint_steps(tmp_path) == [1]


def test_a_workdir_that_is_a_file_or_unwritable_is_named(tiny_config, tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(ConfigError, match=r'--workdir=.*file is a file, not a directory'):
    loop.train(tiny_config, str(tmp_path / 'file'), DEVICES)
  assert (tmp_path / 'file').read_text() == 'x'
  with pytest.raises(ConfigError, match=r'--workdir=/proc/lm_test: cannot write there'):
    loop.train(tiny_config, '/proc/lm_test', DEVICES)


@pytest.fixture(scope='module')
def four_steps(tmp_path_factory):
  """(config, workdir, final params) of a tiny run with checkpoints at steps 2 and 4."""
  from helpers import make_tiny_config
  config = make_tiny_config(tmp_path_factory.mktemp('corpus'))
  config.train.update(num_steps=4, warmup_steps=1, eval_every=4, log_every=1)
  config.checkpoint.update(every_steps=2, max_to_keep=3)
  workdir = str(tmp_path_factory.mktemp('four_steps'))
  _, state = loop.train(config, workdir, DEVICES)
  return config, workdir, jax.device_get(state.params)


def _largest_file(directory) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(directory)
           for name in names]
  return max(files, key=os.path.getsize)


def _flip_a_byte(step_dir):
  path = _largest_file(os.path.join(step_dir, 'state'))
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))


def _truncate(step_dir):
  path = _largest_file(os.path.join(step_dir, 'state'))
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    'a flipped byte in the arrays': _flip_a_byte,
    'a truncated array file': _truncate,
    'a deleted array file': lambda d: os.remove(_largest_file(os.path.join(d, 'state'))),
    'no _METADATA': lambda d: os.remove(os.path.join(d, 'state', '_METADATA')),
    'no config': lambda d: shutil.rmtree(os.path.join(d, 'config')),
    'no data state': lambda d: shutil.rmtree(os.path.join(d, 'data')),
    'another value in the data state':
        lambda d: _edit_json(os.path.join(d, 'data', 'process_0-of-1.json')),
}


def _edit_json(path):
  """Still valid JSON, with one digit changed: only the fingerprint can tell."""
  with open(path) as f:
    text = f.read()
  index = next(i for i, c in enumerate(text) if c.isdigit())
  with open(path, 'w') as f:
    f.write(text[:index] + str((int(text[index]) + 1) % 10) + text[index + 1:])


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_run_resumes_before_it(
    corruption, four_steps, tmp_path, capfd):
  config, finished, want_params = four_steps
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir, ignore=shutil.ignore_patterns('lock'))
  CORRUPTIONS[corruption](os.path.join(workdir, 'checkpoints', '4'))

  history, state = loop.train(config, workdir, DEVICES)
  assert 'checkpoint step 4 cannot be read' in capfd.readouterr().err
  assert os.path.isdir(os.path.join(workdir, 'set_aside', '4'))  # Kept, not deleted.
  assert [row['step'] for row in history if 'loss' in row] == [3, 4]
  assert checkpoint_steps(workdir) == [2, 4]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(state.params), want_params)


def test_a_checkpoint_with_the_data_state_as_one_json_item_still_resumes_exactly(
    four_steps, tmp_path):
  """Checkpoints written before grain's handler held each process's data state kept the
  one process's single stream's state as an orbax JSON item ('data/metadata')."""
  config, finished, want_params = four_steps
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir, ignore=shutil.ignore_patterns('lock'))
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  data = os.path.join(workdir, 'checkpoints', '2', 'data')
  with open(os.path.join(data, 'process_0-of-1.json')) as f:
    [state] = json.load(f)
  os.remove(os.path.join(data, 'process_0-of-1.json'))
  with open(os.path.join(data, 'metadata'), 'w') as f:
    json.dump(state, f)

  history, state = loop.train(config, workdir, DEVICES)
  assert [row['step'] for row in history if 'loss' in row] == [3, 4]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(state.params), want_params)


def test_resuming_with_another_data_stream_is_refused_and_a_finished_run_has_nothing_to_do(
    four_steps, tmp_path, capsys):
  config, finished, _ = four_steps
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir, ignore=shutil.ignore_patterns('lock'))
  for field, value in (('seq_len', 32), ('source', 'jsonl'), ('batch_size', 4)):
    changed = config.copy_and_resolve_references()
    changed.data[field] = value
    if field == 'source':
      (tmp_path / 'lines.jsonl').write_text(''.join(
          f'{{"text": "{"line of words " * 40}{i}"}}\n' for i in range(200)))
      changed.data.path = str(tmp_path / 'lines.jsonl')
    with pytest.raises(ConfigError, match=rf'data.{field}: checkpoint has'):
      loop.train(changed, workdir, DEVICES)

  fewer = config.copy_and_resolve_references()
  fewer.train.num_steps = 3
  history, _ = loop.train(fewer, workdir, DEVICES)
  assert history == []
  assert 'nothing to do: the checkpoint is at step 4' in capsys.readouterr().out
  assert checkpoint_steps(workdir) == [2, 4]


def test_dpo_resumes_after_its_init_from_checkpoint_is_gone(pretrained, tmp_path):
  source = str(tmp_path / 'pretrained')
  shutil.copytree(pretrained[0], source, ignore=shutil.ignore_patterns('lock'))
  config = post_training_config(dpo_config, source, num_steps=2)
  config.checkpoint.every_steps = 1
  workdir = str(tmp_path / 'dpo')
  loop.train(config, workdir, DEVICES)
  shutil.rmtree(os.path.join(source, 'checkpoints'))  # Pruned by the source run, say.

  config.train.num_steps = 3
  history, _ = loop.train(config, workdir, DEVICES)
  # The reference is the run's own copy of the params it started from.
  reference = checkpointing.restore_reference(workdir, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pretrained[1]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(reference),
               jax.device_get(pretrained[1]))
  assert [row['step'] for row in history if 'loss' in row] == [3]


def test_bad_json_lines_are_named_at_start_or_skipped_and_counted(tmp_path):
  path = tmp_path / 'data.jsonl'
  path.write_bytes(b'{"text": "good"}\n{"text": null}\n{"text": "bad \xff byte"}\n[1, 2]\n'
                   b'{"text": "also good"}\n')
  config = type('C', (), dict(source='jsonl', path=str(path), text_field='text',
                              bad_records='error'))
  pretrain = objectives.OBJECTIVES['pretrain']
  with pytest.raises(ConfigError, match=r"data.jsonl:2: field 'text' is null, not a string"
                                        r" \(3 bad lines in all"):
    pretrain.source(config)
  config.bad_records = 'skip'
  source = pretrain.source(config)
  assert [source[i] for i in range(len(source))] == ['good', 'also good']
  assert [why.split(' ', 1)[0].rsplit('/', 1)[1] for _, why in source.skipped] == [
      'data.jsonl:2:', 'data.jsonl:3', 'data.jsonl:4']
  assert 'is not UTF-8 text' in source.skipped[1][1]


def test_a_binary_file_in_a_text_source_is_named_or_skipped(tmp_path):
  pattern = write_corpus(str(tmp_path / 'corpus'), num_files=3)
  (tmp_path / 'corpus' / 'doc_zzz.txt').write_bytes(b'text\nand \x80\x81 binary')
  with pytest.raises(ConfigError, match=r'doc_zzz.txt:2 is not UTF-8 text \(byte 9\) \(1 bad files'):
    sources.TextFiles(sources.expand_paths(pattern))
  kept = sources.TextFiles(sources.expand_paths(pattern), bad_records='skip')
  assert len(kept) == 3 and len(kept.skipped) == 1


def test_an_error_mid_run_leaves_no_half_written_checkpoint(tiny_config, tmp_path,
                                                            monkeypatch):
  tiny_config.train.update(num_steps=6, warmup_steps=1, eval_every=6)
  tiny_config.checkpoint.every_steps = 2
  reads = {'count': 0}
  original = sources.TextFiles.__getitem__
  def failing(self, index):
    reads['count'] += 1
    if reads['count'] > 60:  # Past the first checkpoint's save.
      raise ConfigError('a record that fails mid-run')
    return original(self, index)
  monkeypatch.setattr(sources.TextFiles, '__getitem__', failing)
  with pytest.raises(ConfigError, match='a record that fails mid-run'):
    loop.train(tiny_config, str(tmp_path), DEVICES)
  names = os.listdir(tmp_path / 'checkpoints')
  assert names and all(name.isdigit() for name in names), names
