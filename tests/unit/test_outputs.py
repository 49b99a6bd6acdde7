"""Where a command writes (convert's and merge's --output directories, train_tokenizer's
--output file): a link, a file, a directory that is not empty, a place inside a run's
checkpoints or an existing file is refused by name before anything is written."""

import os
import re

import pytest

from lm.errors import ConfigError, check_new_directory, check_new_file


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
