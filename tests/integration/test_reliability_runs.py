"""Checkpoints that never lie: no non-finite checkpoint, one run per workdir, a corrupt
checkpoint set aside (never deleted) and the run resumed from the newest intact one, a
resumed run's data its own. (A resumed DPO run's reference: tests/integration/
test_post_training_runs.py; bad records: tests/unit/test_reliability.py.)"""

import contextlib
import glob
import io
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.data import sources
from lm.errors import ConfigError
from lm.training import checkpointing, loop, steps

from helpers import make_tiny_config
from test_training_runs import tiny_config  # noqa: F401,F811 (a fixture: one layer)

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


@pytest.mark.parametrize('field', ['learning_rate', 'weight_decay'])
def test_an_update_that_overflows_is_named_and_never_checkpointed(tiny_config, tmp_path,
                                                                   field):
  """Step 1's loss and gradient norm are finite; its update overflows float32 (a value past
  3.4e38), so the params after it are not: they are refused before they are saved."""
  tiny_config.train.update(warmup_steps=0, num_steps=3, log_every=10, eval_every=10,
                           **{field: 1e39})
  tiny_config.checkpoint.every_steps = 1
  with pytest.raises(FloatingPointError, match=(
      r'the params after step 1 are not finite \(NaN or Inf\), e\.g\. \S+, though its loss'
      r' and gradient norm were: the update overflowed; it was not saved, and the last good'
      r' checkpoint is none')):
    loop.train(tiny_config, str(tmp_path), DEVICES)
  assert checkpoint_steps(tmp_path) == []


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
    # Without its fingerprint, a checkpoint of this format could not be checked at all.
    'no fingerprint': lambda d: shutil.rmtree(os.path.join(d, 'fingerprint')),
    'no fingerprint and no commit files': lambda d: _without_fingerprint_and_commits(d),
    'no record of the data files': lambda d: shutil.rmtree(os.path.join(d, 'sources')),
}


def _without_fingerprint_and_commits(step_dir):
  shutil.rmtree(os.path.join(step_dir, 'fingerprint'))
  for root, _, names in os.walk(step_dir):
    for name in names:
      if name == 'commit_success.txt':
        os.remove(os.path.join(root, name))


def _edit_json(path):
  """Still valid JSON, with one digit changed: only the fingerprint can tell."""
  with open(path) as f:
    text = f.read()
  index = next(i for i, c in enumerate(text) if c.isdigit())
  with open(path, 'w') as f:
    f.write(text[:index] + str((int(text[index]) + 1) % 10) + text[index + 1:])


# Step 2 and one step after it for each corruption: the checkpoints of `finished`.
CORRUPT_STEPS = {corruption: 3 + index for index, corruption in enumerate(sorted(CORRUPTIONS))}
NUM_STEPS = 2 + len(CORRUPTIONS)
SAVED_STEPS = list(range(2, NUM_STEPS + 1))


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """(config, workdir, final params) of a tiny run with a checkpoint at every step from
  step 2 on (SAVED_STEPS). Read, never written: a test copies it."""
  config = make_tiny_config(tmp_path_factory.mktemp('corpus'))
  config.model.num_layers = 1  # As in tiny_config above.
  config.train.update(num_steps=NUM_STEPS, warmup_steps=1, eval_every=NUM_STEPS, log_every=1)
  config.checkpoint.update(every_steps=1, max_to_keep=len(SAVED_STEPS))
  workdir = str(tmp_path_factory.mktemp('finished'))
  _, state = loop.train(config, workdir, DEVICES)
  assert checkpoint_steps(workdir) == SAVED_STEPS
  return config, workdir, jax.device_get(state.params)


@pytest.fixture(scope='module')
def resumed_past_corruptions(finished, tmp_path_factory):
  """A copy of `finished` with every checkpoint after step 2 corrupt, each in its own way
  (CORRUPT_STEPS), then resumed: {'workdir', 'history', 'params', 'err' (its stderr)}."""
  config, run, _ = finished
  workdir = str(tmp_path_factory.mktemp('corrupt') / 'run')
  shutil.copytree(run, workdir, ignore=shutil.ignore_patterns('lock'))
  for corruption, step in CORRUPT_STEPS.items():
    CORRUPTIONS[corruption](os.path.join(workdir, 'checkpoints', str(step)))
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    history, state = loop.train(config, workdir, DEVICES)
  return dict(workdir=workdir, history=history, params=jax.device_get(state.params),
              err=err.getvalue())


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_run_resumes_before_it(
    corruption, finished, resumed_past_corruptions):
  # Each newer checkpoint was corrupt too: the run set them aside one by one, newest first.
  _, _, want_params = finished
  workdir, history = resumed_past_corruptions['workdir'], resumed_past_corruptions['history']
  step = CORRUPT_STEPS[corruption]
  assert f'checkpoint step {step} cannot be read' in resumed_past_corruptions['err']
  assert os.path.isdir(os.path.join(workdir, 'set_aside', str(step)))  # Kept, not deleted.
  assert [row['step'] for row in history if 'loss' in row] == list(range(3, NUM_STEPS + 1))
  assert checkpoint_steps(workdir) == SAVED_STEPS
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               resumed_past_corruptions['params'], want_params)


def test_a_checkpoint_with_the_data_state_as_one_json_item_still_resumes_exactly(
    finished, tmp_path):
  """Checkpoints written before grain's handler held each process's data state kept the
  one process's single stream's state as an orbax JSON item ('data/metadata')."""
  config, run, want_params = finished
  workdir = str(tmp_path / 'run')
  shutil.copytree(run, workdir, ignore=shutil.ignore_patterns('lock'))
  for step in SAVED_STEPS[1:]:
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  data = os.path.join(workdir, 'checkpoints', '2', 'data')
  with open(os.path.join(data, 'process_0-of-1.json')) as f:
    [state] = json.load(f)
  os.remove(os.path.join(data, 'process_0-of-1.json'))
  with open(os.path.join(data, 'metadata'), 'w') as f:
    json.dump(state, f)

  history, state = loop.train(config, workdir, DEVICES)
  assert [row['step'] for row in history if 'loss' in row] == list(range(3, NUM_STEPS + 1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(state.params), want_params)


def test_resuming_with_another_data_stream_is_refused_and_a_finished_run_has_nothing_to_do(
    finished, tmp_path, capsys):
  config, run, _ = finished
  workdir = str(tmp_path / 'run')
  shutil.copytree(run, workdir, ignore=shutil.ignore_patterns('lock'))
  for field, value in (('seq_len', 32), ('source', 'jsonl'), ('batch_size', 4)):
    changed = config.copy_and_resolve_references()
    changed.data[field] = value
    if field == 'source':
      (tmp_path / 'lines.jsonl').write_text(''.join(
          f'{{"text": "{"line of words " * 40}{i}"}}\n' for i in range(200)))
      changed.data.path = str(tmp_path / 'lines.jsonl')
    with pytest.raises(ConfigError, match=rf'data.{field}: checkpoint has'):
      loop.train(changed, workdir, DEVICES)

  # The same files with other contents: the saved position would resume elsewhere in them.
  first = sorted(glob.glob(config.data.path))[0]
  with open(first, encoding='utf-8') as f:
    text = f.read()
  try:
    with open(first, 'a', encoding='utf-8') as f:
      f.write(' One sentence more.')
    with pytest.raises(ConfigError, match=rf'config.data: the file {re.escape(first)} changed'
                                          rf' since checkpoint step {NUM_STEPS} in'):
      loop.train(config, workdir, DEVICES)
    os.rename(first, first + '.moved')
    with pytest.raises(ConfigError, match=rf'the file {re.escape(first)} is no longer read'):
      loop.train(config, workdir, DEVICES)
  finally:  # The module's other tests read these files.
    if os.path.exists(first + '.moved'):
      os.rename(first + '.moved', first)
    with open(first, 'w', encoding='utf-8') as f:
      f.write(text)

  fewer = config.copy_and_resolve_references()
  fewer.train.num_steps = 3
  history, _ = loop.train(fewer, workdir, DEVICES)
  assert history == []
  assert f'nothing to do: the checkpoint is at step {NUM_STEPS}' in capsys.readouterr().out
  assert checkpoint_steps(workdir) == SAVED_STEPS


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
