"""The one exception type for bad input, and the checks that raise it."""

import errno
import json
import math
import os


class ConfigError(ValueError):
  """Bad input (a config value, data, tokenizer or checkpoint mismatch), reported before
  anything is compiled or written; the message names the field or file at fault."""


def check(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless `condition`."""
  if not condition:
    raise ConfigError(message)


def check_number(name: str, value, *, at_least=None, above=None, below=None, at_most=None,
                 why: str = '') -> None:
  """Raises ConfigError naming `name` unless `value` is a finite number within the bounds
  (NaN and infinities fail every bound; a bool is not a number here)."""
  bounds = [(at_least, '>=', lambda low: value >= low), (above, '>', lambda low: value > low),
            (below, '<', lambda high: value < high), (at_most, '<=', lambda high: value <= high)]
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  finite = number and (isinstance(value, int) or math.isfinite(value))
  if finite and all(bound is None or holds(bound) for bound, _, holds in bounds):
    return
  wanted = ' and '.join(f'{op} {bound}' for bound, op, _ in bounds if bound is not None)
  kind = 'a finite number' if isinstance(value, float) else 'an integer'
  shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + '...'
  raise ConfigError(f'{name}={shown} must be {kind}' + (f' {wanted}' if wanted else '')
                    + (f' ({why})' if why else ''))


def check_utf8(name: str, value) -> None:
  """Raises ConfigError naming `name` if `value` (a str, or the strings of a JSON value)
  holds a lone surrogate: JSON's escapes ("\\ud800") and undecodable command-line bytes
  spell one, no UTF-8 text holds one, and it would fail when tokenized, mid-run."""
  try:
    json.dumps(value, ensure_ascii=False).encode('utf-8')
  except UnicodeEncodeError as error:
    raise ConfigError(f'{name} holds {error.object[error.start:error.end]!r}, a lone'
                      ' surrogate, which is not UTF-8 text') from error


def check_new_directory(flag: str, path: str) -> None:
  """Refuses an output directory that a command would write into wrongly: a link (a
  dangling one included), a file, a directory that is not empty, or a place inside a
  run's checkpoints directory (the run would take it for a checkpoint)."""
  check(path, f'{flag} is empty: give a new directory')
  shown = f'{flag}={path}'
  check(not os.path.islink(path), f'{shown} is a symbolic link; give a new directory')
  check(not os.path.exists(path) or os.path.isdir(path), f'{shown} is a file, not a directory')
  check(not (os.path.isdir(path) and os.listdir(path)),
        f'{shown} is not empty; give a new directory')
  parent = os.path.dirname(os.path.abspath(path))
  while parent != os.path.dirname(parent):
    check(os.path.basename(parent) != 'checkpoints',
          f'{shown} lies inside {parent}, a run\'s checkpoints: the run would take it for one')
    parent = os.path.dirname(parent)


def check_new_file(flag: str, path: str) -> None:
  """Refuses an output file path that exists (file, directory or link): nothing is
  replaced without a word."""
  check(path, f'{flag} is empty: give a new file path')
  check(not os.path.lexists(path), f'{flag}={path} ' + (
      'is a directory' if os.path.isdir(path) else 'exists') + '; give a new file path')


def check_no_links(flag: str, workdir: str) -> None:
  """Refuses a run directory holding a symbolic link at any depth: what a command writes
  there (checkpoints, logs, results, the lock) would go through it, outside. The directory
  itself may be a link (a run kept on another disk)."""
  for directory, subdirectories, files in os.walk(workdir):  # Links are listed, not entered.
    for name in subdirectories + files:
      path = os.path.join(directory, name)
      if os.path.islink(path):
        raise ConfigError(f'{flag}={workdir}: {path} is a symbolic link (to'
                          f' {os.readlink(path)}); nothing is written through one: remove it')


_OPEN_FLAGS = {'w': os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
               'a': os.O_WRONLY | os.O_CREAT | os.O_APPEND,
               'a+': os.O_RDWR | os.O_CREAT | os.O_APPEND}


def open_own(path: str, mode: str = 'w', encoding: str | None = 'utf-8'):
  """open(path, mode) ('w', 'a' or 'a+') for a file of a run directory, refusing a symbolic
  link in its place by name (O_NOFOLLOW: one planted after `check_no_links` looked)."""
  try:
    descriptor = os.open(path, _OPEN_FLAGS[mode] | os.O_NOFOLLOW, 0o666)
  except OSError as error:
    if error.errno == errno.ELOOP:
      raise ConfigError(f'{path} is a symbolic link; nothing is written through one:'
                        ' remove it') from error
    raise
  return os.fdopen(descriptor, mode, encoding=encoding)
