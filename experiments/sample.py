"""Complete prompts with the latest checkpoint of a run, using its own tokenizer.

  python -m experiments.sample --workdir=/tmp/lm_default --prompt='def main(' \
      [--prompt=... | --prompts_file=FILE (one prompt per line)] [--temperature=0.8 --top_p=0.95]

With --chat each prompt is a user's message (after --system's, if given), rendered by the
checkpoint's chat template (lm's default one for models without), and the assistant's
reply is printed.
"""

import math

from absl import flags
import jax

from experiments import cli
from lm import config as config_lib
from lm import chat, sampling, sharding
from lm.engine import engine
from lm.errors import ConfigError, check, check_utf8
from lm.evaluation import inputs
from lm.training import checkpointing

_WORKDIR, _STEP = cli.checkpoint_flags()
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat for a batch.')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'File with one prompt per line.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 100, 'Tokens to generate at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0 for greedy decoding.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k likeliest tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling threshold (1: off).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_CHAT = flags.DEFINE_bool('chat', False, 'Each prompt is a user message; print the reply.')
_SYSTEM = flags.DEFINE_string('system', None, 'With --chat: a system message before each.')
_KV_CACHE_DTYPE = flags.DEFINE_string(
    'kv_cache_dtype', None, 'The decoding cache\'s dtype: "int8" (a quarter of float32\'s'
    ' bytes, for long generations) or "" (the compute dtype); default: the run\'s.')


def check_flags() -> None:
  """Every flag that needs no checkpoint, before one is loaded; all problems in one line."""
  inputs.check_all([
      inputs.workdir_check(_WORKDIR.value),
      (_KV_CACHE_DTYPE.value in (None,) + config_lib.KV_CACHE_DTYPES,
       f'--kv_cache_dtype={_KV_CACHE_DTYPE.value!r} is not one of {config_lib.KV_CACHE_DTYPES}'),
      (_MAX_NEW_TOKENS.value >= 1, f'--max_new_tokens={_MAX_NEW_TOKENS.value} must be at least 1'),
      (math.isfinite(_TEMPERATURE.value) and _TEMPERATURE.value >= 0,
       f'--temperature={_TEMPERATURE.value} must be a number >= 0 (0: greedy)'),
      (0 < _TOP_P.value <= 1, f'--top_p={_TOP_P.value} must be in (0, 1] (1: off)'),
      (_TOP_K.value >= 0, f'--top_k={_TOP_K.value} must be >= 0 (0: off)'),
      inputs.seed_check(_SEED.value),
      (_CHAT.value or _SYSTEM.value is None, '--system goes with --chat'),
  ])


def read_prompts() -> list[str]:
  prompts = list(_PROMPT.value)
  for prompt in prompts:  # Bytes that are not UTF-8 reach argv as lone surrogates.
    check_utf8('--prompt', prompt)
  if _PROMPTS_FILE.value:
    lines = inputs.read_lines(_PROMPTS_FILE.value, '--prompts_file')
    from_file = [line.rstrip('\n').replace('\\n', '\n') for line in lines if line.strip()]
    if not from_file:
      raise ConfigError(f'--prompts_file={_PROMPTS_FILE.value} holds no prompt (no line that'
                        ' is not blank)')
    prompts += from_file
  if not prompts:
    raise ConfigError('give at least one --prompt or a --prompts_file')
  return prompts


def main():
  check_flags()
  prompts = read_prompts()
  run = checkpointing.restore_for_inference(_WORKDIR.value, _STEP.value, keep_quantized=True,
                                            kv_cache_dtype=_KV_CACHE_DTYPE.value)
  vocab_size, max_seq_len = run.config.model.vocab_size, run.config.model.max_seq_len
  check(_TOP_K.value <= vocab_size,
        f'--top_k={_TOP_K.value} exceeds the vocabulary of the checkpoint ({vocab_size} ids)')
  if _CHAT.value:
    ids = [chat.render(run.tokenizer, conversation(prompt), add_generation_prompt=True).ids
           for prompt in prompts]
    stop_ids = chat.end_of_turn_ids(run.tokenizer)
  else:
    ids = [sampling.prompt_ids(run.tokenizer, p) for p in prompts]
    stop_ids = None
  longest = max(len(i) for i in ids)
  check(longest + _MAX_NEW_TOKENS.value <= max_seq_len,
        f'the longest prompt ({longest} tokens) + --max_new_tokens={_MAX_NEW_TOKENS.value}'
        f' exceeds the model max_seq_len={max_seq_len}')
  # The prompts are split over every device of every process; process 0 prints.
  with sharding.activate(run.mesh):
    completions = engine.complete_ids(
        run.model, run.params, run.tokenizer, [list(i) for i in ids],
        max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value, stop_ids=stop_ids)
  if jax.process_index() == 0:
    for prompt, completion in zip(prompts, completions):
      shown = f'{completion}' if _CHAT.value else f'{prompt}{completion}'
      print(f'--- prompt: {prompt!r}\n{shown}\n')


def conversation(prompt: str) -> list[dict]:
  system = [{'role': 'system', 'content': _SYSTEM.value}] if _SYSTEM.value else []
  return system + [{'role': 'user', 'content': prompt}]


if __name__ == '__main__':
  cli.run(main)
