"""lm-evaluation-harness's command line with lm registered as its model `lm`.

  python -m experiments.lm_eval --model lm --model_args workdir=/tmp/lm_default \
      --tasks my_task --include_path DIR_OF_TASK_YAMLS [--limit N] [--log_samples ...]

Every flag is lm_eval's (`lm_eval run --help`). Needs the `eval` extra:
pip install -e ".[eval]". The adapter is lm/evaluation/lm_eval_model.py.
"""

import os

# The harness's tasks read local files here; nothing is downloaded.
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import sys  # noqa: E402

from lm_eval import __main__ as lm_eval_main  # noqa: E402
from lm_eval import utils  # noqa: E402

from lm.errors import ConfigError  # noqa: E402
from lm.evaluation import lm_eval_model  # noqa: E402,F401  (registers the model 'lm')

def _flag(argv: list[str], name: str) -> str | None:
  """The value of `--name VALUE` or `--name=VALUE` in argv, if given."""
  for index, arg in enumerate(argv):
    if arg == name and index + 1 < len(argv):
      return argv[index + 1]
    if arg.startswith(name + '='):
      return arg[len(name) + 1:]
  return None


def check_model_args(argv: list[str]) -> None:
  """lm's --model_args, checked before the harness indexes its thousands of tasks (the
  adapter checks them again, whichever way the harness passes them)."""
  model_args = _flag(argv, '--model_args')
  if _flag(argv, '--model') == 'lm' and model_args and not model_args.lstrip().startswith('{'):
    lm_eval_model.check_model_args(utils.simple_parse_args_string(model_args))


if __name__ == '__main__':
  try:
    check_model_args(sys.argv[1:])
    lm_eval_main.cli_evaluate()
  except ConfigError as error:  # A bad argument, workdir or step in --model_args: one line.
    sys.exit(f'error: {error}')
  except ValueError as error:
    if not str(error).startswith('Tasks not found'):  # The harness's word for --tasks.
      raise
    sys.exit(f'error: --tasks: {error}')
