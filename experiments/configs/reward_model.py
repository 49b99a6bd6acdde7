"""A reward model: the SFT model with a scalar head in place of its logits, trained to
score a function's body above the same lines in reverse order (pairs from the standard
library, as dpo.py's; no download). Its held-out eval_accuracy is the share of pairs it
ranks right.

Start from an SFT run (or a pretraining or imported one); the head starts fresh:

  python -m experiments.train --config=experiments/configs/reward_model.py \
      --workdir=/tmp/lm_reward --config.train.init_from=/tmp/lm_sft

Then it is a reward for GRPO: --config.train.grpo.reward=model:/tmp/lm_reward. Arithmetic
pairs (a worked solution over one with a slip): --config.data.source=arithmetic. Your own
data: --config.data.source=jsonl --config.data.path=FILES, each line {"prompt": ...,
"chosen": ..., "rejected": ...} and an optional numeric "margin". LoRA works as for SFT
(sft_lora.py's fields); `:tiny` works too.
"""

from experiments.configs import sft


def get_config(variant: str = ''):
  config = sft.get_config(variant)
  config.train.update(objective='reward_model', learning_rate=1e-4, sample_tokens=0)
  config.train.reward_model.center_coefficient = 0.01
  if variant != 'tiny':
    config.train.update(num_steps=200, warmup_steps=20)
  return config
