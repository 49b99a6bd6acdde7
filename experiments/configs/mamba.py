"""The default run with Mamba layers instead of attention (a pure selective-SSM LM).

  python -m experiments.train --config=experiments/configs/mamba.py --workdir=/tmp/lm_mamba

Same corpus, tokenizer, width and trainer as default.py; `:tiny` works too.
"""

from experiments.configs import default


def get_config(variant: str = ''):
  config = default.get_config(variant)
  config.model.layer_pattern = 'mamba'
  return config
