"""The objective registry: each objective is found by its name. A new one that plugs into
the loop through the registry alone: tests/integration/test_objective_runs.py."""

from lm import objectives


def test_every_objective_is_registered_under_its_own_name():
  assert sorted(objectives.OBJECTIVES) == ['distill', 'dpo', 'grpo', 'ppo', 'pretrain',
                                          'reward_model', 'sft']
  for name, objective in objectives.OBJECTIVES.items():
    assert objective.name == name
    assert isinstance(objective, objectives.Objective)
