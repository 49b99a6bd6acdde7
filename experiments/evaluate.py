"""Evaluate a run's checkpoint on tasks: built-in names or JSON-lines files.

  python -m experiments.evaluate --workdir=/tmp/lm_default \
      --task=stdlib_perplexity --task=arithmetic_choice --task=arithmetic [--num_shots=3]
      [--task=my_task.jsonl --limit=100 --self_consistency=5]

Prints a table and writes <workdir>/eval/step_<step>.json. Task formats are in
lm/evaluation/tasks.py.
"""

import json
import os

from absl import flags

from experiments import cli
from lm.evaluation import builtin, harness, scoring, tasks
from lm.training import checkpointing

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory with checkpoints.')
_TASK = flags.DEFINE_multi_string(
    'task', sorted(builtin.BUILTIN_TASKS),
    f'A built-in task ({", ".join(sorted(builtin.BUILTIN_TASKS))}) or a .jsonl file; repeatable.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_NUM_SHOTS = flags.DEFINE_integer('num_shots', 0, 'Solved examples before each question.')
_LIMIT = flags.DEFINE_integer('limit', None, 'Evaluate the first N records of each task.')
_SELF_CONSISTENCY = flags.DEFINE_integer(
    'self_consistency', 1, 'Generation tasks: sample this many answers and take the majority.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.7, 'Sampling temperature for self-consistency.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 16, 'Generation tasks: answer length.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 16, 'Sequences per forward pass.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed for few-shot draws and sampling.')
flags.mark_flags_as_required(['workdir'])


def load_task(name: str) -> tasks.Task:
  if name in builtin.BUILTIN_TASKS:
    return builtin.BUILTIN_TASKS[name]()
  return tasks.load(name)


def main():
  task_list = [load_task(name) for name in _TASK.value]  # Bad task files fail first.
  run = checkpointing.restore_for_inference(_WORKDIR.value, _STEP.value)
  step = run.step
  scorer = scoring.Scorer(run.model, run.params, run.tokenizer,
                          max_length=run.config.data.seq_len, batch_size=_BATCH_SIZE.value)
  results = {}
  for task in task_list:
    results[task.name] = {'kind': task.kind, **harness.evaluate(
        task, scorer, num_shots=_NUM_SHOTS.value, seed=_SEED.value, limit=_LIMIT.value,
        max_new_tokens=_MAX_NEW_TOKENS.value, self_consistency=_SELF_CONSISTENCY.value,
        temperature=_TEMPERATURE.value)}

  print(f'step {step} of {_WORKDIR.value}, {_NUM_SHOTS.value}-shot')
  print(f'{"task":<22}{"kind":<17}metrics')
  for name, metrics in results.items():
    shown = ', '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                      for k, v in metrics.items() if k != 'kind')
    print(f'{name:<22}{metrics["kind"]:<17}{shown}')

  path = os.path.join(_WORKDIR.value, 'eval', f'step_{step}.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  settings = {'num_shots': _NUM_SHOTS.value, 'limit': _LIMIT.value, 'seed': _SEED.value,
              'self_consistency': _SELF_CONSISTENCY.value}
  with open(path + '.tmp', 'w') as f:
    json.dump({'step': step, 'settings': settings, 'results': results}, f, indent=2)
  os.replace(path + '.tmp', path)  # Atomic: a reader never sees half a file.
  print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
