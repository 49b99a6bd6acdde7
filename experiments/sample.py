"""Complete prompts with the latest checkpoint of a run, using its own tokenizer.

  python -m experiments.sample --workdir=/tmp/lm_default --prompt='def main(' \
      [--prompt=... | --prompts_file=FILE (one prompt per line)] [--temperature=0.8 --top_p=0.95]
"""

from absl import flags

from experiments import cli
from lm import sampling
from lm.errors import ConfigError
from lm.training import checkpointing

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory with checkpoints.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat for a batch.')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'File with one prompt per line.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 100, 'Tokens to generate at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0 for greedy decoding.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k likeliest tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling threshold (1: off).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.mark_flags_as_required(['workdir'])


def read_prompts() -> list[str]:
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    try:
      with open(_PROMPTS_FILE.value, encoding='utf-8') as f:
        prompts += [line.rstrip('\n').replace('\\n', '\n') for line in f if line.strip()]
    except OSError as error:
      raise ConfigError(f'--prompts_file={_PROMPTS_FILE.value}: {error.strerror}') from error
  if not prompts:
    raise ConfigError('give at least one --prompt or a --prompts_file')
  return prompts


def main():
  prompts = read_prompts()
  run = checkpointing.restore_for_inference(_WORKDIR.value, _STEP.value)
  longest = max(len(run.tokenizer.encode(p)) + 1 for p in prompts)
  if longest + _MAX_NEW_TOKENS.value > run.config.model.max_seq_len:
    raise ConfigError(
        f'the longest prompt ({longest} tokens) + --max_new_tokens={_MAX_NEW_TOKENS.value}'
        f' exceeds the model max_seq_len={run.config.model.max_seq_len}')
  completions = sampling.complete(
      run.model, run.params, run.tokenizer, prompts, max_new_tokens=_MAX_NEW_TOKENS.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
      seed=_SEED.value)
  for prompt, completion in zip(prompts, completions):
    print(f'--- prompt: {prompt!r}\n{prompt}{completion}\n')


if __name__ == '__main__':
  cli.run(main)
