"""Training objectives by name (`config.train.objective`).

An objective (lm/objectives/base.py) says what its data are, how they become rows, what
its loss is, what its settings are (config.train.<name>, with their defaults) and whether
it needs a reference model or rollouts; the loop, the step, the config checks and the
pipeline are the same for all. Adding one is a module here and a line below.
"""

from lm.errors import ConfigError
from lm.objectives import base, distill, dpo, grpo, ppo, pretrain, reward_model, sft

Objective = base.Objective

OBJECTIVES: dict[str, Objective] = {
    'pretrain': pretrain.Pretrain(),
    'sft': sft.SFT(),
    'dpo': dpo.DPO(),
    'grpo': grpo.GRPO(),
    'reward_model': reward_model.RewardModel(),
    'ppo': ppo.PPO(),
    'distill': distill.Distill(),
}


def get(name: str) -> Objective:
  """The objective `config.train.objective` names; ConfigError naming the field if none."""
  if name not in OBJECTIVES:
    raise ConfigError(f'config.train.objective={name!r} is not one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[name]


def config_sections() -> dict:
  """{name: its settings with their defaults} of the objectives that have settings: the
  sections config.train.<name> of a config (experiments/configs/default.py)."""
  return {name: objective.default_config() for name, objective in OBJECTIVES.items()
          if objective.default_config() is not None}
