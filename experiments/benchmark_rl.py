"""RL that makes a model better at something checkable, as a table: the built-in
arithmetic word problems (lm/data/arithmetic.py), on this machine.

  python -m experiments.benchmark_rl --workdir=/tmp/lm_rl_bench [--seeds=0,1,2]

1. Pretraining on the problems' text (prompts and worked solutions), then SFT on the
   worked solutions: shared by every seed.
2. For each seed: GRPO and PPO from the SFT run with the `math` reward (the final answer
   as math-verify compares it), and PPO against a reward model trained on pairs of a
   worked solution over one that slips (`arithmetic_pairs`); the reward model is shared.
3. Each run's held-out exact match on `arithmetic_problems` (greedy, the first --limit
   problems), the reward model's pair accuracy, and the RL runs' median tokens/s of
   sampling and of updates.

Every stage is a `loop.train` run in its own workdir, so the command resumes where it
stopped. `--variant=tiny` is a smoke run of seconds.
"""

import os
import statistics

from absl import app, flags, logging
import jax

from experiments.configs import default, grpo, ppo, reward_model, sft
from lm import sharding
from lm.evaluation import builtin, harness, scoring
from lm.training import checkpointing, loop

_WORKDIR = flags.DEFINE_string('workdir', '/tmp/lm_rl_bench', "Where the stages' runs go.")
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'The RL runs\' seeds, one row each.')
_LIMIT = flags.DEFINE_integer('limit', 200, 'Held-out problems scored per run.')
_PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', 1500, 'Pretraining steps.')
_SFT_STEPS = flags.DEFINE_integer('sft_steps', 300, 'SFT steps.')
_RL_STEPS = flags.DEFINE_integer('rl_steps', 60, 'Optimizer steps of each RL run.')
_REWARD_MODEL_STEPS = flags.DEFINE_integer('reward_model_steps', 200, 'Reward model steps.')
_VARIANT = flags.DEFINE_string('variant', '', 'Config variant of the runs ("tiny": a smoke run).')


def configured(module, steps: int, seed: int = 0, **train):
  """`module`'s config on the arithmetic task, `steps` long, logged and evaluated at its end."""
  config = module.get_config(_VARIANT.value)
  # The held-out problems are arithmetic_problems' (its validation fraction); a problem
  # and its solution take about 200 bytes.
  config.data.update(source='arithmetic', validation_fraction=0.05, seq_len=256)
  config.seed = seed
  config.train.update(num_steps=steps, log_every=max(steps // 10, 1), eval_every=steps,
                      warmup_steps=min(config.train.warmup_steps, steps // 10),
                      sample_tokens=0, **train)
  config.checkpoint.every_steps = steps
  return config


def stages(seeds: list[int]) -> list[tuple[str, int, object]]:
  """(name, seed, config) of every run, in the order they start from each other."""
  root = _WORKDIR.value
  runs = [('pretrain', 0, configured(default, _PRETRAIN_STEPS.value)),
          ('sft', 0, configured(sft, _SFT_STEPS.value, init_from=f'{root}/pretrain'))]
  runs.append(('reward_model', 0, configured(reward_model, _REWARD_MODEL_STEPS.value,
                                             init_from=f'{root}/sft')))
  for seed in seeds:
    math_grpo = configured(grpo, _RL_STEPS.value, seed, init_from=f'{root}/sft')
    math_grpo.train.grpo.update(reward='math', max_new_tokens=64)
    math_ppo = configured(ppo, _RL_STEPS.value, seed, init_from=f'{root}/sft')
    math_ppo.train.ppo.update(reward='math', max_new_tokens=64)
    model_ppo = configured(ppo, _RL_STEPS.value, seed, init_from=f'{root}/sft')
    model_ppo.train.ppo.update(reward=f'model:{root}/reward_model', max_new_tokens=64,
                               critic='model', critic_init=f'{root}/reward_model')
    runs += [('grpo_math', seed, math_grpo), ('ppo_math', seed, math_ppo),
             ('ppo_reward_model', seed, model_ppo)]
  for _, _, config in runs:
    config.model.dtype = 'float32' if jax.default_backend() == 'cpu' else config.model.dtype
  return runs


def evaluate(workdir: str, reward_model_run: bool) -> float:
  """Held-out exact match of a language model, or pair accuracy of a reward model."""
  head = 'score' if reward_model_run else 'lm'
  run = checkpointing.restore_for_inference(workdir, head=head)
  if reward_model_run:
    task = builtin.arithmetic_pairs()
    scorer = scoring.RewardScorer.for_run(run)
  else:
    task = builtin.arithmetic_problems()
    scorer = scoring.Scorer.for_run(run)
  with sharding.activate(run.mesh):
    metrics = harness.evaluate(task, scorer, limit=_LIMIT.value, max_new_tokens=64)
  return metrics['accuracy' if reward_model_run else 'exact_match']


def median(history: list[dict], name: str) -> float:
  values = [row[name] for row in history if name in row]
  return statistics.median(values) if values else float('nan')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  # Checkpoints fall between rollouts: GRPO's 2 updates and PPO's 2 x 2 each divide it.
  if _RL_STEPS.value % 4:
    raise app.UsageError(f'--rl_steps={_RL_STEPS.value} must be a multiple of 4')
  rows = []
  for name, seed, config in stages([int(seed) for seed in _SEEDS.value]):
    suffix = '' if name in ('pretrain', 'sft', 'reward_model') else f'_seed{seed}'
    workdir = os.path.join(_WORKDIR.value, name + suffix)
    history, _ = loop.train(config, workdir)
    logged = history or []  # A finished run resumed does nothing and logs nothing.
    rows.append(dict(name=name, seed=seed if suffix else '', score=evaluate(
        workdir, name == 'reward_model'), sampled=median(logged, 'sampled_tokens_per_second'),
        updates=median(logged, 'update_tokens_per_second'), steps=config.train.num_steps))
  if jax.process_index() != 0:
    return
  print(f'{jax.devices()[0].device_kind} x {jax.device_count()}; held-out arithmetic_problems'
        f' (first {_LIMIT.value}, greedy); the reward model: arithmetic_pairs accuracy')
  print('| run | seed | steps | exact match (reward model: accuracy) | sampled tokens/s'
        ' | update tokens/s |')
  print('|---|---|---|---|---|---|')
  shown = lambda value: '-' if value != value else f'{value:,.0f}'  # NaN: not RL.
  for row in rows:
    print(f'| {row["name"]} | {row["seed"]} | {row["steps"]} | {row["score"]:.3f} |'
          f' {shown(row["sampled"])} | {shown(row["updates"])} |')


if __name__ == '__main__':
  app.run(main)
