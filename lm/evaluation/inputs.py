"""Checks of what sampling and evaluation are given (flags, text files, the workdir), each
failure one ConfigError naming the flag or file:line. (A checkpoint's params that are not
finite are refused by checkpointing.restore_for_inference.)"""

import io
import json
import os

from lm.errors import ConfigError, check_utf8


def check_all(checks: list[tuple[bool, str]]) -> None:
  """Raises one ConfigError with the message of every failed (ok, message) check, so one
  run names every bad flag."""
  problems = [message for ok, message in checks if not ok]
  if problems:
    raise ConfigError('; '.join(problems))


def workdir_check(workdir: str) -> tuple[bool, str]:
  """(whether `workdir` is a directory, what it is instead), for check_all."""
  return os.path.isdir(workdir), f'--workdir={workdir} ' + (
      'is a file, not a run directory' if os.path.exists(workdir) else 'does not exist')


def seed_check(seed: int) -> tuple[bool, str]:
  """--seed as jax.random and grain take it: an unsigned 32-bit integer."""
  return 0 <= seed < 2**32, f'--seed={seed} must be in [0, 2**32)'


def read_lines(path: str, flag: str) -> list[str]:
  """The lines of the UTF-8 text file `flag`=`path`, as open(path) reads them."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as error:
    raise ConfigError(f'{flag}={path}: {error.strerror}') from error
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as error:
    line = data.count(b'\n', 0, error.start) + 1
    raise ConfigError(f'{flag}={path}:{line} is not UTF-8 text ({error.reason})') from error
  return io.StringIO(text, newline=None).readlines()  # Universal newlines, as open() does.


def json_records(path: str, flag: str):
  """(file:line, object) for each non-blank line of the JSON-lines file `flag`=`path`;
  a line that is not a JSON object is named by file:line."""
  for number, line in enumerate(read_lines(path, flag), start=1):
    if not line.strip():
      continue
    where = f'{path}:{number}'
    try:
      record = json.loads(line)
    except (ValueError, RecursionError) as error:  # Also ints too long, nesting too deep.
      raise ConfigError(f'{where} is not valid JSON: {error}') from error
    if not isinstance(record, dict):
      raise ConfigError(f'{where}: each line must be a JSON object')
    check_utf8(where, record)
    yield where, record
