"""DPO: prefer a function's body to the same lines in reverse order, given its signature
and docstring summary (pairs from the standard library; no download). Both responses
hold the same tokens, so the preference is for code in an order that runs.

Start from an SFT run (or a pretraining run), which is also the frozen reference:

  python -m experiments.train --config=experiments/configs/dpo.py --workdir=/tmp/lm_dpo \
      --config.train.init_from=/tmp/lm_sft

eval_reward_accuracy is the share of held-out pairs whose chosen body gains more
log-probability over the reference than the rejected one. The learning rate is 50x
below SFT's: at 1e-4 the held-out accuracy was as high, but each chosen body lost 54
nats against the reference and samples turned to noise (docs/benchmarks.md).

For your own data: --config.data.source=jsonl --config.data.path=FILES, each line
{"prompt": ..., "chosen": ..., "rejected": ...}. `:tiny` works too.
"""

from experiments.configs import default


def get_config(variant: str = ''):
  config = default.get_config(variant)
  config.train.objective = 'dpo'
  config.data.update(source='stdlib_functions', seq_len=512, batch_size=8,
                     shuffle_window=1024)
  config.train.update(num_steps=200, learning_rate=1e-5, warmup_steps=20, dpo_beta=0.1,
                      z_loss_weight=0.0, log_every=25, eval_every=100, sample_tokens=200)
  config.checkpoint.every_steps = 100
  if variant == 'tiny':
    config.data.update(seq_len=256, batch_size=4, shuffle_window=64)
    config.train.update(num_steps=4, warmup_steps=1, log_every=2, eval_every=4, eval_steps=2,
                        sample_tokens=20)
    config.checkpoint.every_steps = 2
  return config
