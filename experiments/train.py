"""Pretrain (or resume) a language model.

  python -m experiments.train --config=experiments/configs/default.py --workdir=DIR \
      [--config.train.num_steps=200 ...]

Running the same command again resumes from the last checkpoint in DIR.
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli
from lm.training import loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main():
  loop.train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
