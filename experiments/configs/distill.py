"""Distillation: a student half the default model's width trained on the default run's
next-token distributions, on the same corpus (lm/objectives/distill.py).

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/lm_default
  python -m experiments.train --config=experiments/configs/distill.py --workdir=/tmp/lm_distill \
      --config.train.distill.teacher=/tmp/lm_default

eval_token_loss is the student's held-out next-token loss (nats per byte), to compare
with the eval_loss of the same student trained from scratch for the same steps:
--config=experiments/configs/distill.py:scratch. Divergences (forward_kl, reverse_kl,
GKD's jsd with beta), temperature, a top-k teacher and on-policy batches
(data='examples', on_policy_fraction) are config.train.distill's fields. `:tiny` works too.
"""

from experiments.configs import default


def get_config(variant: str = ''):
  config = default.get_config('tiny' if variant == 'tiny' else '')
  config.train.objective = 'distill'
  if variant != 'tiny':  # Half the default's width: embeddings, heads and MLP.
    config.model.update(embed_dim=64, num_heads=2, num_kv_heads=1, mlp_dim=192)
  if variant == 'tiny':
    config.train.distill.max_new_tokens = 16  # Of the tiny rows' 64 tokens.
  if variant == 'scratch':  # The same student, steps and tokens, on the data alone.
    config.train.objective = 'pretrain'
  return config
