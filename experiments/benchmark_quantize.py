"""Weight-only quantization of a run: what it saves and what it costs, as a table.

  python -m experiments.benchmark_quantize --workdir=/tmp/lm_default [--step=N] \
      [--schemes=int8,int4 --group_size=64] [--task=stdlib_perplexity --task=arithmetic]
      [--limit=20 --max_length=N --new_tokens=128 --batch_size=1]

One row for the run as saved, then one per scheme, quantized in memory as
experiments.quantize stores it and run as sample and evaluate run it: bytes of the params
(int4 counted packed, as it would be stored), each task's figure (a perplexity task's
perplexity, a generation task's exact match, a multiple choice's accuracy) and greedy
decode tokens/s on this machine (--batch_size rows of --new_tokens tokens after a short
prompt, compilation excluded, the best of --repeats). Nothing is written.
"""

import time

from absl import flags
import jax
import jax.numpy as jnp

from experiments import cli
from lm import quantization, sampling, sharding
from lm.errors import check, check_number
from lm.evaluation import builtin, harness, scoring
from lm.training import checkpointing

_WORKDIR, _STEP = cli.checkpoint_flags()
_SCHEMES = flags.DEFINE_list('schemes', list(quantization.SCHEMES), 'Schemes to compare.')
_GROUP_SIZE = flags.DEFINE_integer('group_size', quantization.DEFAULT_GROUP_SIZE,
                                   'int4: inputs per scale.')
_TASK = flags.DEFINE_multi_string('task', ['stdlib_perplexity', 'arithmetic'],
                                  f'Built-in tasks ({", ".join(sorted(builtin.BUILTIN_TASKS))}).')
_LIMIT = flags.DEFINE_integer('limit', 20, 'Records of each task.')
_MAX_LENGTH = flags.DEFINE_integer(
    'max_length', None, "Tokens scored at once (default: the model's context, as evaluate's).")
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'Decoded tokens per row when timing.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 1, 'Rows decoded at once when timing.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed decodes; the best is shown.')

# The figure each task kind reports.
_FIGURE = {'perplexity': 'perplexity', 'generation': 'exact_match', 'choice': 'accuracy'}


def decode_tokens_per_second(model, params, tokenizer, max_seq_len: int) -> float:
  """Greedy decoding of --new_tokens after a short prompt (no stop id: every row runs the
  whole length), best of --repeats after a compiling call."""
  prompts_bt, lengths_b = sampling.pad_prompts(
      [sampling.prompt_ids(tokenizer, 'def main(')] * _BATCH_SIZE.value, tokenizer.pad_id,
      multiple=16)
  cache_length = prompts_bt.shape[1] + _NEW_TOKENS.value
  check(cache_length <= max_seq_len, f'--new_tokens={_NEW_TOKENS.value} and a prompt of'
        f' {prompts_bt.shape[1]} tokens exceed the model\'s max_seq_len={max_seq_len}')
  decode = lambda: sampling.generate(  # noqa: E731
      params, sharding.put_rows(prompts_bt), sharding.put_rows(lengths_b), jax.random.key(0),
      jnp.zeros((0,), jnp.int32), model=model, max_new_tokens=_NEW_TOKENS.value,
      cache_length=cache_length)
  jax.block_until_ready(decode())
  best = float('inf')
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(decode())
    best = min(best, time.perf_counter() - start)
  return _BATCH_SIZE.value * _NEW_TOKENS.value / best


def measure(run, model, params, tasks, max_length: int) -> dict:
  """{'bytes', task name: figure, 'tokens/s'} of `model` with `params`."""
  scorer = scoring.Scorer(model, params, run.tokenizer, max_length=max_length)
  row = {'bytes': quantization.param_bytes(params)}
  for task in tasks:
    metrics = harness.evaluate(task, scorer, limit=_LIMIT.value,
                               max_new_tokens=harness.default_max_new_tokens(task))
    row[task.name] = metrics[_FIGURE[task.kind]]
  row['tokens/s'] = decode_tokens_per_second(model, params, run.tokenizer,
                                             run.config.model.max_seq_len)
  return row


def main():
  for flag in (_LIMIT, _NEW_TOKENS, _BATCH_SIZE, _REPEATS, _GROUP_SIZE):
    check_number(f'--{flag.name}', flag.value, at_least=1)
  for scheme in _SCHEMES.value:
    check(scheme in quantization.SCHEMES,
          f'--schemes: {scheme!r} is not one of {", ".join(quantization.SCHEMES)}')
  for name in _TASK.value:
    check(name in builtin.BUILTIN_TASKS,
          f'--task={name} is not one of {", ".join(sorted(builtin.BUILTIN_TASKS))}')
  run = checkpointing.restore_for_inference(_WORKDIR.value, _STEP.value)
  check(not quantization.scheme_of(run.config), f'--workdir={_WORKDIR.value} is already'
        ' quantized: give the run it was quantized from')
  for scheme in _SCHEMES.value:
    quantization.check_groups(run.config.model, scheme, _GROUP_SIZE.value, '--group_size')
  tasks = [builtin.BUILTIN_TASKS[name]() for name in _TASK.value]
  max_length = scoring.context_length(run.config, run.tokenizer.trained_here, _MAX_LENGTH.value)
  rows = {}
  with sharding.activate(run.mesh):
    rows[run.config.model.param_dtype] = measure(run, run.model, run.params, tasks, max_length)
    for scheme in _SCHEMES.value:
      model, params = quantization.quantize(run.model, run.params, scheme, _GROUP_SIZE.value,
                                            run.mesh)
      grouping = (f'groups of {_GROUP_SIZE.value}' if scheme in quantization.TILED
                  else 'per channel')
      rows[f'{scheme} ({grouping})'] = measure(run, model, params, tasks, max_length)
  if jax.process_index() != 0:
    return
  columns = ['bytes'] + [f'{task.name} {_FIGURE[task.kind]}' for task in tasks] + ['tokens/s']
  print(f'step {run.step} of {_WORKDIR.value} on {jax.devices()[0].platform}'
        f' ({len(jax.devices())} devices), {_LIMIT.value} records per task in a context of'
        f' {max_length}, decode {_BATCH_SIZE.value} x {_NEW_TOKENS.value} tokens')
  print('| weights | ' + ' | '.join(columns) + ' |')
  print('|---' * (len(columns) + 1) + '|')
  for name, row in rows.items():
    values = [f'{row["bytes"] / 2**20:.2f} MiB'] + [
        f'{row[task.name]:.4f}' for task in tasks] + [f'{row["tokens/s"]:.0f}']
    print(f'| {name} | ' + ' | '.join(values) + ' |')


if __name__ == '__main__':
  cli.run(main)
