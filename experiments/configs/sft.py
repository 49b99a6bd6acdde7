"""SFT: the default model fine-tuned to write a function's body from its signature and
the first paragraph of its docstring, on every documented function of the standard
library (no download; the modules pretraining held out stay held out).

Start from a pretraining run, then fine-tune it in a new workdir:

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/lm_default
  python -m experiments.train --config=experiments/configs/sft.py --workdir=/tmp/lm_sft \
      --config.train.init_from=/tmp/lm_default

Only the body and its end (eos) are targets. For your own data: --config.data.source=jsonl
--config.data.path=FILES, each line {"prompt": ..., "response": ...}. `:tiny` works too.
"""

from experiments.configs import default


def get_config(variant: str = ''):
  config = default.get_config(variant)
  config.train.objective = 'sft'
  config.data.update(source='stdlib_functions', seq_len=512, batch_size=8,
                     shuffle_window=1024)
  config.train.update(num_steps=300, learning_rate=5e-4, warmup_steps=30, log_every=25,
                      eval_every=100, sample_tokens=200)
  config.checkpoint.every_steps = 100
  if variant == 'tiny':
    config.data.update(seq_len=256, batch_size=4, shuffle_window=64)
    config.train.update(num_steps=4, warmup_steps=1, log_every=2, eval_every=4, eval_steps=2,
                        sample_tokens=20)
    config.checkpoint.every_steps = 2
  return config
