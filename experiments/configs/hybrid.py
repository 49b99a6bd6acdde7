"""The default run with Mamba and attention layers interleaved, two Mamba per attention.

  python -m experiments.train --config=experiments/configs/hybrid.py --workdir=/tmp/lm_hybrid

`--config.model.layer_pattern=...` sets any other interleaving (repeated over num_layers).
"""

from experiments.configs import default


def get_config(variant: str = ''):
  config = default.get_config(variant)
  config.model.update(layer_pattern='mamba,mamba,attention',
                      num_layers=3 if variant == 'tiny' else 6)
  return config
