"""What every entry point shares: flag parsing and one-line errors for bad input."""

import re
import sys

from absl import app, flags, logging

from lm.errors import ConfigError


def _parse_flags(argv: list[str]) -> list[str]:
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
    sys.exit(f'error: {error}')


def run(main) -> None:
  """app.run with quiet library logging and bad input (ConfigError) as one message."""

  def main_with_errors(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    logging.set_verbosity(logging.ERROR)  # orbax logs every file it writes, and more.
    try:
      main()
    except ConfigError as error:
      sys.exit(f'error: {error}')

  app.run(main_with_errors, flags_parser=_parse_flags)
