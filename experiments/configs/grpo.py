"""GRPO: reinforcement learning from a checkable reward on the model's own samples.

Each step the policy completes `data.batch_size` function prompts (signature and
docstring summary, from the standard library; no download) `grpo.group_size` times;
a completion scores 1 if it ends and the function parses and reads every parameter,
0.5 if it only parses, else 0 (lm/objectives/rewards.py). Completions better than their
group's mean are made likelier, worse ones less likely, with a KL penalty that keeps the
policy near the model it started from. Each rollout serves two updates, with PPO's clip
against the policy that sampled. Start from an SFT run:

  python -m experiments.train --config=experiments/configs/grpo.py --workdir=/tmp/lm_grpo \
      --config.train.init_from=/tmp/lm_sft

eval_reward is the mean reward of completions of held-out prompts, sampled with the same
keys at every evaluation. On a 2-core CPU the 100 steps take about 11 minutes (18 at
one update per rollout) and eval_reward rises from 0.25 to about 0.56, mostly through
short bodies that end and parse (docs/benchmarks.md). For your own prompts:
--config.data.source=jsonl --config.data.path=FILES, each line {"prompt": ..., "answer": ...} with
--config.train.grpo.reward=exact_match, or any fields and a reward of your own in
lm/objectives/rewards.py. `:tiny` works too.
"""

from experiments.configs import sft


def get_config(variant: str = ''):
  config = sft.get_config(variant)
  config.train.objective = 'grpo'
  config.data.batch_size = 4  # Prompts: 32 completions a rollout.
  # Sampling is most of a step's time on a CPU: a second update per rollout halves it.
  config.train.grpo.updates_per_rollout = 2
  config.train.update(num_steps=100, learning_rate=5e-5, warmup_steps=10, log_every=10,
                      eval_every=25, eval_steps=4)
  if variant == 'accelerator':
    config.data.batch_size = 8  # A multiple of a TPU host's 8 cores.
  if variant == 'tiny':
    config.data.batch_size = 2
    config.train.grpo.update(group_size=2, max_new_tokens=16)
    config.train.update(num_steps=4, warmup_steps=1, log_every=2, eval_every=4, eval_steps=1)
  return config
