"""Evaluate a run's checkpoint on tasks: built-in names, JSON-lines files, or the field's
benchmarks from their published files (lm/evaluation/benchmarks.py).

  python -m experiments.evaluate --workdir=/tmp/lm_default \
      --task=stdlib_perplexity --task=arithmetic_choice --task=arithmetic [--num_shots=3]
      [--task=my_task.jsonl --limit=100 --self_consistency=5]
      [--task=mmlu:DIR --task=hellaswag:FILE --task=arc:FILE --task=gsm8k:FILE]

A reward model (objective 'reward_model') is evaluated on pairs, its accuracy the share
it ranks right: --task=arithmetic_pairs (its default) or a .jsonl of {"prompt", "chosen",
"rejected"} lines.

Every task is scored in the model's own context (an imported model's
max_position_embeddings, a model trained here the rows it was trained on), or --max_length
below it, as lm-evaluation-harness
scores it (lm/evaluation/scoring.py): longer contexts lose their start, and the table
counts the records cut; documents longer than the context are scored in rolling windows.

Prints a table and adds the results, task by task, to <workdir>/eval/step_<step>.json
(lm/evaluation/results.py); --log_samples also writes each record's log-likelihoods or
completion to <workdir>/eval/step_<step>_samples/<task>.jsonl. Task formats are in
lm/evaluation/tasks.py.
"""

import math

from absl import flags
import jax

from experiments import cli
from lm import config as config_lib
from lm import chat, sharding
from lm.errors import check, check_no_links
from lm.evaluation import benchmarks, builtin, harness, inputs, results, scoring, tasks
from lm.training import checkpointing

_WORKDIR, _STEP = cli.checkpoint_flags()
_TASK = flags.DEFINE_multi_string(
    'task', sorted(builtin.BUILTIN_TASKS),
    f'A built-in task ({", ".join(sorted(builtin.BUILTIN_TASKS))}) or a .jsonl file; repeatable.')
_NUM_SHOTS = flags.DEFINE_integer('num_shots', 0, 'Solved examples before each question.')
_LIMIT = flags.DEFINE_integer('limit', None, 'Evaluate the first N records of each task.')
_SELF_CONSISTENCY = flags.DEFINE_integer(
    'self_consistency', 1, 'Generation tasks: sample this many answers and take the majority.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.7, 'Sampling temperature for self-consistency.')
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    'max_new_tokens', None, 'Generation tasks: answer length (default: 16; 256 for a chain'
    ' of thought, as gsm8k; 64 for a worked solution, as arithmetic_problems).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 16, 'Sequences per forward pass.')
_MAX_LENGTH = flags.DEFINE_integer(
    'max_length', None, "Tokens the model reads at once (default: the model's context:"
    " an imported model's max_position_embeddings, a model trained here its"
    ' config.data.seq_len); longer contexts lose their start.')
_LOG_SAMPLES = flags.DEFINE_bool(
    'log_samples', False, "Write each record's log-likelihoods or completion to"
    ' <workdir>/eval/step_<step>_samples/<task>.jsonl.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed for few-shot draws and sampling.')
_CHAT = flags.DEFINE_bool(
    'chat', False, "Prompt through the model's chat template: each prompt, shots included,"
    " one user message; answers are the assistant's, ending at its end of turn.")
_KV_CACHE_DTYPE = flags.DEFINE_string(
    'kv_cache_dtype', None, 'The decoding cache\'s dtype: "int8" (a quarter of float32\'s'
    ' bytes, for long generations) or "" (the compute dtype); default: the run\'s.')


def check_flags() -> None:
  """Every flag that needs no checkpoint, before one is loaded; all problems in one line."""
  limit, temperature = _LIMIT.value, _TEMPERATURE.value
  inputs.check_all([
      inputs.workdir_check(_WORKDIR.value),
      (_KV_CACHE_DTYPE.value in (None,) + config_lib.KV_CACHE_DTYPES,
       f'--kv_cache_dtype={_KV_CACHE_DTYPE.value!r} is not one of {config_lib.KV_CACHE_DTYPES}'),
      (limit is None or limit >= 1, f'--limit={limit} must be at least 1'),
      (_BATCH_SIZE.value >= 1, f'--batch_size={_BATCH_SIZE.value} must be at least 1'),
      (_MAX_LENGTH.value is None or _MAX_LENGTH.value >= 2,
       f'--max_length={_MAX_LENGTH.value} must be at least 2'),
      (_NUM_SHOTS.value >= 0, f'--num_shots={_NUM_SHOTS.value} must be >= 0'),
      (_SELF_CONSISTENCY.value >= 1,
       f'--self_consistency={_SELF_CONSISTENCY.value} must be at least 1'),
      (_MAX_NEW_TOKENS.value is None or _MAX_NEW_TOKENS.value >= 1,
       f'--max_new_tokens={_MAX_NEW_TOKENS.value} must be at least 1'),
      (math.isfinite(temperature) and temperature >= 0,
       f'--temperature={temperature} must be a number >= 0'),
      inputs.seed_check(_SEED.value),
      (not (_CHAT.value and _NUM_SHOTS.value),
       '--chat puts a prompt in one user message: give shots in the task (the benchmarks'
       ' do), not --num_shots'),
  ])
  check_no_links('--workdir', _WORKDIR.value)  # Results are written into it.


def load_task(name: str) -> tasks.Task:
  if name in builtin.BUILTIN_TASKS:
    return builtin.BUILTIN_TASKS[name]()
  if name in builtin.REWARD_MODEL_TASKS:
    return builtin.REWARD_MODEL_TASKS[name]()
  if benchmarks.is_benchmark(name):
    task = benchmarks.load(name)
    check(not (task.fixed_shots and _NUM_SHOTS.value),
          f'--num_shots={_NUM_SHOTS.value}: --task={name} uses its published'
          f' {task.fixed_shots} shots; leave --num_shots at 0')
    return task
  return tasks.load(name)


def max_new_tokens(task: tasks.Task) -> int:
  if _MAX_NEW_TOKENS.value is not None:
    return _MAX_NEW_TOKENS.value
  return harness.default_max_new_tokens(task)


def main():
  check_flags()
  given = flags.FLAGS['task'].present
  task_list = [load_task(name) for name in _TASK.value] if given else None  # Bad files first.
  run = checkpointing.restore_for_inference(_WORKDIR.value, _STEP.value, head=None,
                                            keep_quantized=True,
                                            kv_cache_dtype=_KV_CACHE_DTYPE.value)
  reward_model = run.config.model.get('head', 'lm') == 'score'
  if task_list is None:  # The defaults of what it holds.
    task_list = [load_task(name) for name in (
        sorted(builtin.REWARD_MODEL_TASKS) if reward_model else _TASK.value)]
  held = 'a reward model' if reward_model else 'a language model'
  for task in task_list:
    check((task.kind == 'pairs') == reward_model,
          f'--task={task.name} holds {task.kind} records, for '
          f'{"a reward model" if task.kind == "pairs" else "a language model"};'
          f' --workdir={_WORKDIR.value} holds {held}')
  check(not (reward_model and (_NUM_SHOTS.value or _CHAT.value)),
        f'--num_shots and --chat prompt a language model; --workdir={_WORKDIR.value} holds {held}')
  max_length = scoring.context_length(run.config, run.tokenizer.trained_here, _MAX_LENGTH.value)
  for task in task_list:
    check(task.kind != 'generation' or max_new_tokens(task) < max_length,
          f'--max_new_tokens={max_new_tokens(task)} leaves no room for a prompt of'
          f' {task.name} in a context of {max_length} tokens (--max_length)')
  if reward_model:
    scorer = scoring.RewardScorer.for_run(run, max_length=max_length,
                                          batch_size=_BATCH_SIZE.value)
  else:
    stop_ids = None
    if _CHAT.value:
      task_list = [harness.as_chat(task, run.tokenizer) for task in task_list]
      stop_ids = chat.end_of_turn_ids(run.tokenizer)
    scorer = scoring.Scorer.for_run(run, max_length=max_length, batch_size=_BATCH_SIZE.value,
                                    stop_ids=stop_ids)
  metrics_by_task, samples_by_task = {}, {}
  # Every process scores the same records over all devices; process 0 reports.
  with sharding.activate(run.mesh):
    for task in task_list:
      samples_by_task[task.name] = []
      metrics_by_task[task.name] = {'kind': task.kind, **harness.evaluate(
          task, scorer, num_shots=_NUM_SHOTS.value, seed=_SEED.value, limit=_LIMIT.value,
          max_new_tokens=max_new_tokens(task), self_consistency=_SELF_CONSISTENCY.value,
          temperature=_TEMPERATURE.value, samples=samples_by_task[task.name])}
  if jax.process_index() != 0:
    return

  print(f'step {run.step} of {_WORKDIR.value}, {_NUM_SHOTS.value}-shot, context {max_length}'
        ' tokens')
  print(f'{"task":<22}{"kind":<17}metrics')
  for name, metrics in metrics_by_task.items():
    shown = ', '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                      for k, v in metrics.items() if k != 'kind' and not isinstance(v, dict))
    print(f'{name:<22}{metrics["kind"]:<17}{shown}')
    for subject, accuracy in metrics.get('acc_by_subject', {}).items():
      print(f'  {subject:<40}acc={accuracy:.4f}')

  # Printed first, so a results file that cannot be written loses nothing.
  path = results.path(_WORKDIR.value, run.step)
  settings = {'num_shots': _NUM_SHOTS.value, 'chat': _CHAT.value, 'limit': _LIMIT.value,
              'max_length': max_length,
              'seed': _SEED.value,
              'self_consistency': _SELF_CONSISTENCY.value, 'temperature': _TEMPERATURE.value,
              'max_new_tokens': {task.name: max_new_tokens(task) for task in task_list
                                 if task.kind == 'generation'}}
  results.save(path, run.step, metrics_by_task, settings)
  print(f'wrote {path}')
  if _LOG_SAMPLES.value:
    directory = results.samples_directory(_WORKDIR.value, run.step)
    results.save_samples(directory, samples_by_task)
    print(f'wrote {directory}')


if __name__ == '__main__':
  cli.run(main)
