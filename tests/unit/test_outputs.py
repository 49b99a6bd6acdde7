"""Where a command writes (convert's and merge's --output directories, train_tokenizer's
--output file): a link, a file, a directory that is not empty, a place inside a run's
checkpoints or an existing file is refused by name before anything is written; and a run
directory holding a link, which a command would write through, outside."""

import os
import re

import pytest

from lm.errors import (ConfigError, check_new_directory, check_new_file, check_no_links,
                       open_own)


def test_an_output_directory_must_be_new_or_empty_and_outside_a_runs_checkpoints(tmp_path):
  check_new_directory('--output', str(tmp_path / 'new'))
  (tmp_path / 'empty').mkdir()
  check_new_directory('--output', str(tmp_path / 'empty'))
  (tmp_path / 'file').write_text('x')
  os.symlink(tmp_path / 'nowhere', tmp_path / 'dangling')
  os.symlink(tmp_path / 'empty', tmp_path / 'link')
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'a').write_text('x')
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  for name, message in (('file', 'is a file, not a directory'),
                        ('dangling', 'is a symbolic link; give a new directory'),
                        ('link', 'is a symbolic link; give a new directory'),
                        ('full', 'is not empty; give a new directory'),
                        ('run/checkpoints/30', f'lies inside {tmp_path}/run/checkpoints, a'
                                               " run's checkpoints: the run would take it for"
                                               ' one')):
    path = str(tmp_path / name)
    with pytest.raises(ConfigError, match=re.escape(f'--output={path} {message}')):
      check_new_directory('--output', path)
  with pytest.raises(ConfigError, match='--output is empty'):
    check_new_directory('--output', '')


def test_an_output_file_is_never_replaced(tmp_path):
  check_new_file('--output', str(tmp_path / 'new.model'))
  (tmp_path / 'old.model').write_text('x')
  os.symlink(tmp_path / 'nowhere', tmp_path / 'dangling.model')
  for name, what in (('old.model', 'exists'), ('dangling.model', 'exists'), ('', 'is a directory')):
    path = str(tmp_path / name)
    with pytest.raises(ConfigError, match=re.escape(f'--output={path} {what}; give a new file')):
      check_new_file('--output', path)


def test_a_link_anywhere_in_a_run_directory_is_named(tmp_path):
  run = tmp_path / 'run'
  (run / 'checkpoints' / '4' / 'state').mkdir(parents=True)
  check_no_links('--workdir', str(run))
  os.symlink(tmp_path / 'elsewhere', run / 'checkpoints' / '4' / 'state' / 'd')
  with pytest.raises(ConfigError, match=re.escape(
      f'--workdir={run}: {run}/checkpoints/4/state/d is a symbolic link (to'
      f' {tmp_path}/elsewhere); nothing is written through one')):
    check_no_links('--workdir', str(run))
  # The run directory itself may be one: a run kept on another disk.
  os.remove(run / 'checkpoints' / '4' / 'state' / 'd')
  os.symlink(run, tmp_path / 'linked_run')
  check_no_links('--workdir', str(tmp_path / 'linked_run'))


def test_a_file_of_a_run_is_never_written_through_a_link(tmp_path):
  outside = tmp_path / 'outside'
  outside.write_text('precious\n')
  os.symlink(outside, tmp_path / 'metrics.jsonl')
  for mode in ('w', 'a', 'a+'):
    with pytest.raises(ConfigError, match=re.escape(
        f'{tmp_path}/metrics.jsonl is a symbolic link; nothing is written through one')):
      open_own(str(tmp_path / 'metrics.jsonl'), mode)
  assert outside.read_text() == 'precious\n'
  with open_own(str(tmp_path / 'new.json')) as f:
    f.write('{}')
  with open_own(str(tmp_path / 'new.json'), 'a') as f:
    f.write('\n')
  assert (tmp_path / 'new.json').read_text() == '{}\n'
