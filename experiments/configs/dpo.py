"""DPO: prefer a function's body to the same lines in reverse order, given its signature
and docstring summary (pairs from the standard library; no download). Both responses
hold the same tokens, so the preference is for code in an order that runs. The data,
sizes and schedule are sft.py's.

Start from an SFT run (or a pretraining run), which is also the frozen reference:

  python -m experiments.train --config=experiments/configs/dpo.py --workdir=/tmp/lm_dpo \
      --config.train.init_from=/tmp/lm_sft

eval_reward_accuracy is the share of held-out pairs whose chosen body gains more
log-probability over the reference than the rejected one. The learning rate is 50x
below SFT's because higher rates, at the same accuracy, also push the chosen bodies' own
likelihood far below the reference's, and samples degrade (docs/benchmarks.md);
`dpo.nll_weight` > 0 (RPO) holds it up instead.

Other losses of the family: --config.train.dpo.loss=robust (with dpo.label_smoothing),
ipo, hinge, or the reference-free simpo and orpo (no reference is loaded or run; they
log eval_log_prob_accuracy, the share of held-out pairs whose chosen body is the likelier
per token, in place of the reward's).

For your own data: --config.data.source=jsonl --config.data.path=FILES, each line
{"prompt": ..., "chosen": ..., "rejected": ...}. `:tiny` works too.
"""

from experiments.configs import sft


def get_config(variant: str = ''):
  config = sft.get_config(variant)
  config.train.update(objective='dpo', learning_rate=1e-5)
  config.train.dpo.beta = 0.1
  if variant != 'tiny':
    config.train.update(num_steps=200, warmup_steps=20)
  return config
