"""What every entry point shares: flag parsing, and one line, not a traceback, for bad
input or a diverged run."""

import ast
import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging

from lm import distributed
from lm.errors import ConfigError

# Hosts started by hand; on Cloud TPU pods, SLURM and Open MPI, JAX finds these itself.
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Several processes: host:port of process 0, the same for all.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Several processes: how many.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Several processes: this one\'s, from 0.')
_PEER_TIMEOUT = flags.DEFINE_integer(
    'peer_timeout', distributed.PEER_TIMEOUT,
    'Several processes: seconds a process that sends no heartbeat (stopped, stalled) is waited'
    ' for before every other one ends in one line.')


def checkpoint_flags():
  """--workdir (required) and --step: the checkpoint that sample and evaluate read."""
  workdir = flags.DEFINE_string('workdir', None, 'Run directory with checkpoints.')
  step = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.mark_flags_as_required(['workdir'])
  return workdir, step


def _check_config_file(argv: list[str]) -> None:
  """A --config file that is missing, is not Python or has no get_config is named in one
  line here; ml_collections would raise a traceback, or report a bogus field."""
  values = [arg.split('=', 1)[1] for arg in argv if arg.startswith('--config=')]
  values += [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == '--config']
  for value in values:
    path = value.split(':', 1)[0]
    if not os.path.isfile(path):
      sys.exit(f'error: --config={value}: no such file {path!r}')
    try:
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError) as error:
      where = f'{path}:{error.lineno}' if getattr(error, 'lineno', None) else path
      sys.exit(f'error: --config={value}: {where}: not valid Python'
               f' ({getattr(error, "msg", None) or error})')
    if not any(isinstance(node, ast.FunctionDef) and node.name == 'get_config'
               for node in tree.body):
      sys.exit(f'error: --config={value}: {path} defines no get_config()')


def _parse_flags(argv: list[str]) -> list[str]:
  _check_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    # ml_collections reports an unknown override as KeyError("'name'\nDid you mean ...").
    message = str(error).encode().decode('unicode_escape')
    name = re.search(r"(\w+)", message).group(1)
    overrides = [arg.split('=')[0].lstrip('-') for arg in argv if arg.startswith('--config.')]
    culprit = next((o for o in overrides if name in o.split('.')), f'config.{name}')
    hint = re.search(r'Did you mean "(\w+)"', message)
    sys.exit(f'error: unknown config field {culprit!r}'
             + (f' (did you mean {hint.group(1)!r}?)' if hint else ''))
  except flags.Error as error:
    lines = str(error).strip().splitlines()
    if 'Traceback (most recent call last):' in lines:  # get_config raised: its last line.
      lines = [lines[0], lines[-1]]
    sys.exit('error: ' + ' '.join(lines))


def _quiet_abandoned_reads() -> None:
  """A restore that fails (a corrupt checkpoint) abandons orbax's other reads: asyncio logs
  each unretrieved future, and each coroutine collected later prints 'Event loop is closed',
  all with tracebacks. The failure itself is reported (or the checkpoint set aside) in one
  line, so those go unprinted."""
  std_logging.getLogger('asyncio').setLevel(std_logging.CRITICAL)
  default_hook = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    orbax_read = code is not None and '/orbax/' in code.co_filename
    # tensorstore's callbacks into the loop orbax has closed.
    closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                   and str(unraisable.exc_value) == 'Event loop is closed')
    if not (orbax_read or closed_loop):
      default_hook(unraisable)
  sys.unraisablehook = hook


def run(main) -> None:
  """app.run with several processes connected (lm.distributed), quiet library logging,
  and bad input (ConfigError) as one message."""

  def main_with_errors(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    logging.set_verbosity(logging.ERROR)  # orbax logs every file it writes, and more.
    _quiet_abandoned_reads()
    try:
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                             _PEER_TIMEOUT.value)
      main()
    except (ConfigError, FloatingPointError) as error:  # Bad input, or a diverged run.
      if distributed.joined():  # The others may be gone: no shutdown that waits for them.
        distributed.stop(f'error: {error}')
      sys.exit(f'error: {error}')
    except Exception as error:  # pylint: disable=broad-except
      if not distributed.lost_another_process(error):
        raise
      distributed.lost_peer(str(error))

  app.run(main_with_errors, flags_parser=_parse_flags)
