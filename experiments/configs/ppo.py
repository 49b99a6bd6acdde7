"""PPO: reinforcement learning with a critic, on the prompts, sampler and rewards of
grpo.py (one completion per prompt; a rule, or a trained reward model with
--config.train.ppo.reward=model:/tmp/lm_reward). The critic is a value head on the
policy's trunk, fresh beside the SFT model it starts from; each rollout's advantages
(GAE) are computed once and serve `ppo.epochs` passes of `ppo.minibatches` updates.
Start from an SFT run:

  python -m experiments.train --config=experiments/configs/ppo.py --workdir=/tmp/lm_ppo \
      --config.train.init_from=/tmp/lm_sft

eval_reward is the mean reward of completions of held-out prompts, sampled with the same
keys at every evaluation. The math task: --config.data.source=arithmetic
--config.train.ppo.reward=math+math_format. `:tiny` works too.
"""

from experiments.configs import sft


def get_config(variant: str = ''):
  config = sft.get_config(variant)
  config.train.objective = 'ppo'
  config.data.batch_size = 16  # Prompts: one completion each.
  config.train.ppo.update(epochs=2, minibatches=2, max_new_tokens=64)
  config.train.update(num_steps=100, learning_rate=5e-5, warmup_steps=10, log_every=10,
                      eval_every=25, eval_steps=2)
  if variant == 'tiny':
    config.data.batch_size = 4
    config.train.ppo.update(max_new_tokens=16, epochs=2, minibatches=2)
    config.train.update(num_steps=8, warmup_steps=1, log_every=2, eval_every=8, eval_steps=1)
    config.checkpoint.every_steps = 4
  return config
