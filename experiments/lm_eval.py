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

from lm.errors import ConfigError  # noqa: E402
from lm.evaluation import lm_eval_model  # noqa: E402,F401  (registers the model 'lm')

if __name__ == '__main__':
  try:
    lm_eval_main.cli_evaluate()
  except ConfigError as error:  # A bad argument, workdir or step in --model_args: one line.
    sys.exit(f'error: {error}')
  except ValueError as error:
    if not str(error).startswith('Tasks not found'):  # The harness's word for --tasks.
      raise
    sys.exit(f'error: --tasks: {error}')
