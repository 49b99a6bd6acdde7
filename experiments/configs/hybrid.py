"""The default run with Mamba and attention layers interleaved, two Mamba per attention.

  python -m experiments.train --config=experiments/configs/hybrid.py --workdir=/tmp/lm_hybrid

`--config.model.layer_pattern=...` sets any other interleaving (repeated over num_layers).
Variants: '' (the default run's size), 'tiny', and '1b': 0.87B parameters (width 2048, 16
Mamba and 8 attention layers, a 32768-token vocabulary for a sentencepiece tokenizer of
that size), for accelerators: Pallas kernels, full remat.
"""

from experiments.configs import default


def get_config(variant: str = ''):
  if variant not in ('', 'tiny', '1b'):
    raise ValueError(f'unknown variant {variant!r}; one of "", "tiny", "1b"')
  config = default.get_config('tiny' if variant == 'tiny' else '')
  config.model.update(layer_pattern='mamba,mamba,attention',
                      num_layers=3 if variant == 'tiny' else 6)
  if variant == '1b':
    config.model.update(vocab_size=32768, num_layers=24, embed_dim=2048, num_heads=16,
                        num_kv_heads=8, head_dim=128, mlp_dim=5632, max_seq_len=2048,
                        mamba_dt_rank=128, attention='pallas', mamba_scan='pallas',
                        remat='full')
    config.data.update(seq_len=2048, batch_size=32)
  return config
