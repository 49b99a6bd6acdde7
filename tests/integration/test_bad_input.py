"""Property: random bad values of every config field and flag, and random corruptions of
data lines, task lines and checkpoint files, never reach a traceback.

Each example runs an entry point as its own process (conftest's `commands`, through
tests/fork_server.py, which pays JAX's import once) against one small finished run
(conftest's `trained_run`), and asserts:
- a bad value or line: exit 1 with one line on stderr, starting 'error:', naming the field,
  flag or file:line; and no file of the run changed;
- a corrupt checkpoint: `sample` prints what it prints from the intact run or names the
  checkpoint in one line; `train` sets it aside in one line and resumes before it, ending
  exactly where an uncorrupted resume ends.

The examples are drawn from a fixed seed (derandomize), so CI runs the same ones
(LM_BAD_INPUT_EXPLORE=1: new ones each run); how many were tried and how many ended
cleanly goes to $LM_BAD_INPUT_REPORT when that is set.
"""

import collections
import json
import os
import random
import shutil

from absl import flags as absl_flags
import hypothesis
from hypothesis import strategies as st
import pytest

from experiments.configs import default

from helpers import snapshot

# LM_BAD_INPUT_EXPLORE=1 draws new examples each run, to look for more.
SETTINGS = dict(derandomize=not os.environ.get('LM_BAD_INPUT_EXPLORE'), database=None,
                deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
COUNTS = collections.defaultdict(lambda: [0, 0])  # kind -> [tried, ended cleanly]
OUTCOMES = collections.defaultdict(collections.Counter)  # kind -> {how it ended: count}


@pytest.fixture(scope='module', autouse=True)
def report():
  """How many examples of each kind were tried and ended cleanly, to $LM_BAD_INPUT_REPORT."""
  yield
  if os.environ.get('LM_BAD_INPUT_REPORT'):
    with open(os.environ['LM_BAD_INPUT_REPORT'], 'a') as f:
      for kind, (tried, clean) in sorted(COUNTS.items()):
        f.write(json.dumps({'kind': kind, 'tried': tried, 'ended_cleanly': clean,
                            **dict(OUTCOMES[kind])}) + '\n')


# The finished run every example is tried on: conftest's `trained_run` (checkpoints at
# steps 2 and 4), its command given again with no sample at the end.

@pytest.fixture(scope='module')
def run(trained_run):
  return dict(workdir=str(trained_run['workdir']),
              flags=[*trained_run['flags'], '--config.train.sample_tokens=0'])


def without_workdir(flags: list[str]) -> list[str]:
  return [flag for flag in flags if not flag.startswith('--workdir')]


def assert_refused(kind: str | None, result, culprits: tuple[str, ...], workdir: str,
                   before: dict):
  """Exit 1, one 'error:' line on stderr naming one of `culprits`, no traceback, and the
  run's files as they were. Counted under `kind`, if given."""
  counts = COUNTS[kind] if kind else [0, 0]
  counts[0] += 1
  returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
  lines = stderr.strip().splitlines()
  assert 'Traceback' not in stdout + stderr, stderr[-3000:]
  assert returncode == 1 and len(lines) == 1 and lines[0].startswith('error:'), (
      returncode, stderr[-3000:])
  assert any(culprit in lines[0] for culprit in culprits), lines[0]
  assert snapshot(workdir) == before
  counts[1] += 1


# Bad values. Every config field is listed, with what is outside its domain on the tiny
# run (64-token rows, max_seq_len 256, 2 query heads, 1 KV head, batch 8, one device,
# 259 byte ids, checkpoints at steps 2 and 4); the test fails when a field is added
# without one.

WORDS = st.from_regex(r'[A-Za-z_][A-Za-z0-9_.\-]{0,11}', fullmatch=True)


def _parses(parse, text: str) -> bool:
  try:
    parse(text)
  except ValueError:
    return False
  return True


NOT_INT = st.one_of(WORDS.filter(lambda s: not _parses(int, s)),
                    st.floats(allow_nan=False, allow_infinity=False)
                    .filter(lambda x: not x.is_integer()).map(repr))
NOT_FLOAT = WORDS.filter(lambda s: not _parses(float, s))
NOT_BOOL = WORDS.filter(lambda s: not _parses(absl_flags.BooleanParser().parse, s))
NON_FINITE = st.sampled_from(['nan', 'inf', '-inf'])


def ints(*, at_least=None, below=None, also=()) -> st.SearchStrategy:
  """Integers outside [at_least, below), `also`, and text that is not an integer."""
  outside = [NOT_INT, *(st.just(str(v)) for v in also)]
  if at_least is not None:
    outside.append(st.integers(max_value=at_least - 1).map(str))
  if below is not None:
    outside.append(st.integers(min_value=below).map(str))
  return st.one_of(outside)


def floats(*, above=None, at_least=None, below=None, at_most=None) -> st.SearchStrategy:
  """Numbers outside the bounds, NaN, infinities, and text that is not a number."""
  outside = [NON_FINITE, NOT_FLOAT]
  if above is not None:
    outside.append(st.floats(max_value=above, allow_nan=False, allow_infinity=False).map(repr))
  if at_least is not None:
    outside.append(st.floats(max_value=at_least, exclude_max=True, allow_nan=False,
                             allow_infinity=False).map(repr))
  if below is not None:
    outside.append(st.floats(min_value=below, allow_nan=False, allow_infinity=False).map(repr))
  if at_most is not None:
    outside.append(st.floats(min_value=at_most, exclude_min=True, allow_nan=False,
                             allow_infinity=False).map(repr))
  return st.one_of(outside)


def choices(*valid: str) -> st.SearchStrategy:
  return WORDS.filter(lambda s: s not in valid)


def paths(*kinds: str) -> st.SearchStrategy:
  """Placeholders for paths that the `bad_paths` fixture makes: missing, a file, an empty directory,
  binary bytes, a text file that is no model, a glob that matches nothing."""
  return st.sampled_from(kinds).map(lambda kind: '{' + kind + '}')


MAMBA = ('--config.model.layer_pattern=mamba',)
LLAMA3 = ('--config.model.rope_scaling.kind=llama3',)
# Post-training starts from the run, in a workdir of its own.
DPO = ('--config.train.objective=dpo', '--config.data.source=stdlib_functions',
       '--workdir={fresh}', '--config.train.init_from={run}')
GRPO = ('--config.train.objective=grpo', '--config.data.source=stdlib_functions',
        '--workdir={fresh}', '--config.train.init_from={run}', '--config.checkpoint.every_steps=2',
        '--config.train.grpo.max_new_tokens=16')
PPO = ('--config.train.objective=ppo', '--config.data.source=stdlib_functions',
       '--workdir={fresh}', '--config.train.init_from={run}', '--config.checkpoint.every_steps=4',
       '--config.train.ppo.max_new_tokens=16')
REWARD_MODEL = ('--config.train.objective=reward_model', '--config.data.source=stdlib_functions',
                '--workdir={fresh}', '--config.train.init_from={run}')
# A student distilled from the run; with prompts and responses for its on-policy fields.
DISTILL = ('--config.train.objective=distill', '--workdir={fresh}',
           '--config.train.distill.teacher={run}')
DISTILL_EXAMPLES = DISTILL + ('--config.data.source=stdlib_functions',
                              '--config.train.distill.data=examples',
                              '--config.train.distill.max_new_tokens=16')
# Low-rank adapters on the run, in a workdir of their own.
LORA = ('--config.train.objective=sft', '--config.data.source=stdlib_functions',
        '--workdir={fresh}', '--config.train.init_from={run}', '--config.lora.rank=4')
POSITIVE_INT = ints(at_least=1)
ODD = st.integers(0, 500).map(lambda n: str(2 * n + 1))
NON_NEGATIVE_FLOAT = floats(at_least=0)
POSITIVE_FLOAT = floats(above=0)

CONFIG_FIELDS = {  # field: (bad values, flags that make the field matter)
    'seed': (ints(at_least=0, below=2**32), ()),
    'checkpoint.every_steps': (POSITIVE_INT, ()),
    'checkpoint.max_to_keep': (POSITIVE_INT, ()),
    'data.bad_records': (choices('error', 'skip'), ()),
    'data.batch_size': (POSITIVE_INT, ()),
    'data.path': (paths('missing', 'empty_dir', 'no_match'), ()),
    'data.seq_len': (ints(at_least=2, below=257), ()),
    'data.shuffle_window': (ints(at_least=0), ()),
    'data.source': (choices('stdlib', 'text', 'jsonl', 'arithmetic'), ()),
    # One process: any count of streams that divides the batch of 8.
    'data.streams': (ints(at_least=0, below=9, also=(3, 5, 6, 7)), ()),
    'data.text_field': (choices('text'), ('--config.data.source=jsonl',
                                          '--config.data.path={jsonl}')),
    'data.validation_fraction': (floats(above=0, below=1), ()),
    'lora.alpha': (POSITIVE_FLOAT, LORA),
    'lora.base_dtype': (choices('', 'int8', 'int4', 'nf4'), LORA),
    'lora.dropout': (floats(at_least=0, below=1), LORA),
    'lora.rank': (ints(at_least=0), LORA[:4]),
    'lora.targets': (choices('attention', 'mlp', 'mamba', 'query', 'key', 'value', 'out',
                             'wi_gate', 'wi_up', 'wo', 'in_proj', 'x_proj', 'dt_proj',
                             'out_proj'), LORA),
    'lora.tile_size': (POSITIVE_INT, LORA),
    'mesh.data': (ints(at_least=-1, below=2, also=(0,)), ()),
    'mesh.fsdp': (ints(at_least=1, below=2), ()),
    'mesh.tensor': (ints(at_least=1, below=2), ()),
    'model.attention': (choices('xla', 'pallas', 'cudnn'), ()),  # cudnn: GPU only.
    'model.dtype': (choices('auto', 'float32', 'bfloat16'), ()),
    'model.embed_dim': (POSITIVE_INT, ()),
    'model.head_dim': (st.one_of(ints(at_least=1), ODD), ()),  # RoPE rotates pairs.
    'model.layer_pattern': (choices('attention', 'mamba'), ()),
    'model.mamba_conv_width': (POSITIVE_INT, MAMBA),
    'model.mamba_dt_rank': (POSITIVE_INT, MAMBA),
    'model.mamba_expand': (POSITIVE_INT, MAMBA),
    'model.mamba_scan': (choices('pallas', 'reference', 'chunked'), MAMBA),
    'model.mamba_state_dim': (POSITIVE_INT, MAMBA),
    'model.max_seq_len': (ints(at_least=64), ()),
    'model.mlp_dim': (POSITIVE_INT, ()),
    'model.name': (choices('decoder', 'from_init'), ()),
    'model.norm_eps': (POSITIVE_FLOAT, ()),
    'model.num_heads': (POSITIVE_INT, ()),
    'model.num_kv_heads': (ints(at_least=1, below=3), ()),  # 1 and 2 divide 2 query heads.
    'model.num_layers': (POSITIVE_INT, ()),
    'model.remat': (choices('none', 'full', 'save_dots'), ()),
    'model.kv_cache_dtype': (choices('', 'int8'), ()),
    'model.rope_theta': (POSITIVE_FLOAT, ()),
    'model.rope_scaling.kind': (choices('none', 'llama3'), ()),
    'model.rope_scaling.factor': (POSITIVE_FLOAT, LLAMA3),
    'model.rope_scaling.low_freq_factor': (POSITIVE_FLOAT, LLAMA3),
    'model.rope_scaling.high_freq_factor': (floats(above=1.0), LLAMA3),  # > low_freq_factor.
    'model.rope_scaling.original_max_len': (POSITIVE_INT, LLAMA3),
    'model.param_dtype': (choices('float32', 'bfloat16'), ()),
    'model.scale_embeddings': (NOT_BOOL, ()),
    'model.sliding_window': (ints(at_least=0), ()),  # 0: no window.
    'model.qkv_bias': (NOT_BOOL, ()),
    'model.attention_out_bias': (NOT_BOOL, ()),
    'model.qk_norm': (NOT_BOOL, ()),
    'model.tie_embeddings': (NOT_BOOL, ()),
    'model.vocab_size': (ints(at_least=259), ()),
    'tokenizer.kind': (choices('byte', 'sentencepiece', 'huggingface'), ()),
    'tokenizer.path': (paths('missing', 'empty_dir', 'text', 'binary'),
                       ('--config.tokenizer.kind=sentencepiece',)),
    'train.beta1': (floats(at_least=0, below=1), ()),
    'train.beta2': (floats(at_least=0, below=1), ()),
    'train.reward_model.center_coefficient': (NON_NEGATIVE_FLOAT, REWARD_MODEL),
    'train.ppo.reward': (choices('python_function'), PPO),
    'train.ppo.max_new_tokens': (ints(at_least=1, below=64), PPO),
    'train.ppo.temperature': (POSITIVE_FLOAT, PPO),
    'train.ppo.kl_weight': (NON_NEGATIVE_FLOAT, PPO),
    'train.ppo.kl_estimator': (choices('k1', 'k3'), PPO),
    'train.ppo.gamma': (floats(at_least=0, at_most=1), PPO),
    'train.ppo.lam': (floats(at_least=0, at_most=1), PPO),
    'train.ppo.clip_epsilon': (POSITIVE_FLOAT, PPO),
    'train.ppo.clip_epsilon_high': (NON_NEGATIVE_FLOAT, PPO),
    'train.ppo.value_clip': (POSITIVE_FLOAT, PPO),
    'train.ppo.value_weight': (NON_NEGATIVE_FLOAT, PPO),
    'train.ppo.entropy_weight': (NON_NEGATIVE_FLOAT, PPO),
    'train.ppo.epochs': (POSITIVE_INT, PPO),
    'train.ppo.minibatches': (POSITIVE_INT, PPO),
    'train.ppo.missing_eos_penalty': (NON_NEGATIVE_FLOAT, PPO),
    'train.ppo.whiten_advantages': (NOT_BOOL, PPO),
    'train.ppo.critic': (choices('head', 'model'), PPO),
    'train.ppo.critic_init': (paths('missing', 'empty_dir', 'text'),
                              PPO + ('--config.train.ppo.critic=model',)),
    'train.distill.teacher': (paths('missing', 'empty_dir', 'text'), DISTILL[:2]),
    'train.distill.divergence': (choices('forward_kl', 'reverse_kl', 'jsd'), DISTILL),
    'train.distill.beta': (floats(above=0, below=1),
                           DISTILL + ('--config.train.distill.divergence=jsd',)),
    'train.distill.temperature': (POSITIVE_FLOAT, DISTILL),
    'train.distill.token_loss_weight': (NON_NEGATIVE_FLOAT, DISTILL),
    'train.distill.top_k': (ints(at_least=0, below=265), DISTILL),
    'train.distill.data': (choices('text', 'examples'), DISTILL),
    'train.distill.on_policy_fraction': (floats(at_least=0, at_most=1), DISTILL_EXAMPLES),
    'train.distill.max_new_tokens': (ints(at_least=1, below=64), DISTILL_EXAMPLES),
    'train.distill.sampling_temperature': (POSITIVE_FLOAT, DISTILL_EXAMPLES),
    'train.distill.teacher_logits': (paths('missing', 'empty_dir', 'text'), DISTILL),
    'train.dpo.beta': (POSITIVE_FLOAT, DPO),
    'train.dpo.label_smoothing': (floats(at_least=0, below=0.5), DPO),
    'train.dpo.loss': (choices('sigmoid', 'robust', 'ipo', 'hinge', 'simpo', 'orpo'), DPO),
    'train.dpo.nll_weight': (NON_NEGATIVE_FLOAT, DPO),
    'train.dpo.orpo_lambda': (NON_NEGATIVE_FLOAT, DPO),
    'train.dpo.simpo_gamma': (NON_NEGATIVE_FLOAT, DPO),
    'train.epsilon': (POSITIVE_FLOAT, ()),
    'train.eval_every': (POSITIVE_INT, ()),
    'train.eval_steps': (POSITIVE_INT, ()),
    'train.final_learning_rate_ratio': (floats(at_least=0, at_most=1), ()),
    'train.grad_accumulation_steps': (st.one_of(ints(at_least=1, below=9, also=(3, 5, 6, 7))), ()),
    'train.grad_clip_norm': (POSITIVE_FLOAT, ()),
    'train.grpo.advantage': (choices('grpo', 'rloo', 'dr_grpo'), GRPO),
    'train.grpo.aggregation': (choices('token_mean', 'sequence_mean', 'constant'), GRPO),
    'train.grpo.clip_epsilon': (POSITIVE_FLOAT, GRPO),
    'train.grpo.clip_epsilon_high': (NON_NEGATIVE_FLOAT, GRPO),
    'train.grpo.dynamic_sampling_rounds': (ints(at_least=0), GRPO),
    'train.grpo.group_size': (ints(at_least=2), GRPO),
    'train.grpo.kl_weight': (NON_NEGATIVE_FLOAT, GRPO),
    'train.grpo.max_new_tokens': (ints(at_least=1, below=64), GRPO),
    'train.grpo.ratio': (choices('token', 'sequence'), GRPO),
    'train.grpo.reward': (choices('python_function'), GRPO),
    'train.grpo.temperature': (POSITIVE_FLOAT, GRPO),
    'train.grpo.updates_per_rollout': (POSITIVE_INT, GRPO),
    'train.init_from': (paths('missing', 'empty_dir', 'text'), DPO[:3]),  # Not {run}.
    'train.init_from_step': (ints(at_least=-1, also=(0, 1, 3, 5)), DPO),
    'train.learning_rate': (POSITIVE_FLOAT, ()),
    'train.log_every': (POSITIVE_INT, ()),
    'train.num_steps': (POSITIVE_INT, ()),
    'train.objective': (choices('pretrain', 'sft', 'dpo', 'grpo', 'reward_model', 'ppo',
                                'distill'), ()),
    'train.sample_temperature': (NON_NEGATIVE_FLOAT, ()),
    'train.sample_tokens': (ints(at_least=0, below=64), ()),
    'train.warmup_steps': (ints(at_least=0, below=4), ()),
    'train.weight_decay': (NON_NEGATIVE_FLOAT, ()),
    'train.z_loss_weight': (NON_NEGATIVE_FLOAT, ()),
}


def config_fields(config, prefix='') -> list[str]:
  fields = []
  for name, value in config.items():
    if hasattr(value, 'items'):
      fields += config_fields(value, f'{prefix}{name}.')
    else:
      fields.append(prefix + name)
  return fields


def test_every_config_field_has_bad_values_to_try():
  assert sorted(config_fields(default.get_config('tiny'))) == sorted(CONFIG_FIELDS)


@pytest.fixture(scope='module')
def bad_paths(run, tmp_path_factory):
  """{kind: path} for the placeholders of `paths`; and {run}, {jsonl}: a good run and file."""
  root = tmp_path_factory.mktemp('paths')
  (root / 'empty_dir').mkdir()
  (root / 'text').write_text('not a model\n')
  (root / 'binary').write_bytes(bytes(range(256)) * 4)
  (root / 'good.jsonl').write_text(''.join(json.dumps({'text': f'line {i} of text ' * 8}) + '\n'
                                           for i in range(40)))
  return dict(missing=str(root / 'missing'), empty_dir=str(root / 'empty_dir'),
              text=str(root / 'text'), binary=str(root / 'binary'),
              no_match=str(root / 'nothing_*.txt'), run=run['workdir'], fresh=str(root / 'fresh'),
              jsonl=str(root / 'good.jsonl'))


def fill(flag: str, bad_paths: dict) -> str:
  for name, path in bad_paths.items():
    flag = flag.replace('{' + name + '}', path)
  return flag.replace('{fresh}', os.path.join(bad_paths['fresh'], os.urandom(6).hex()))


@pytest.mark.parametrize('field', sorted(CONFIG_FIELDS))
@hypothesis.settings(max_examples=5, **SETTINGS)
@hypothesis.given(data=st.data())
def test_a_bad_config_value_is_named_in_one_line_and_the_run_is_untouched(
    field, data, commands, run, bad_paths):
  values, context = CONFIG_FIELDS[field]
  value = data.draw(values, label='value')
  before = snapshot(run['workdir'])
  flags = run['flags'] + [fill(flag, bad_paths) for flag in context]
  result = commands('experiments.train', *flags, fill(f'--config.{field}={value}', bad_paths))
  # The mesh's axes are checked together: 'config.mesh {...}' names them all.
  culprits = (field, 'config.mesh') if field.startswith('mesh.') else (field,)
  assert_refused('config value', result, culprits, run['workdir'], before)


def test_the_runs_own_command_resumes_with_nothing_to_do(commands, run, tmp_path):
  """So that in the property above the bad value, not the rest, is refused. (On a copy:
  the run is only read.)"""
  shutil.copytree(run['workdir'], tmp_path / 'run')
  result = commands('experiments.train', *without_workdir(run['flags']),
                    f'--workdir={tmp_path / "run"}')
  assert result.returncode == 0 and 'nothing to do' in result.stdout + result.stderr, (
      result.stderr[-2000:])


SAMPLE_FLAGS = {
    # The prompt is bos + 6 bytes; max_seq_len is 256.
    'max_new_tokens': ints(at_least=1, below=250),
    'temperature': NON_NEGATIVE_FLOAT,
    'top_k': ints(at_least=0, below=265),
    'top_p': floats(above=0, at_most=1),
    'seed': ints(at_least=0, below=2**32),
    'step': ints(also=(-1, 0, 1, 3, 5)).filter(lambda v: v not in ('2', '4')),
    'workdir': paths('missing', 'empty_dir', 'text'),
    'prompts_file': paths('missing', 'empty_dir', 'binary'),
    'chat': NOT_BOOL,
    'kv_cache_dtype': choices('', 'int8'),
}
EVALUATE_FLAGS = {
    'limit': POSITIVE_INT,
    'batch_size': POSITIVE_INT,
    'num_shots': ints(at_least=0, also=(10**6,)),
    'self_consistency': POSITIVE_INT,
    'temperature': NON_NEGATIVE_FLOAT,
    'max_new_tokens': ints(at_least=1, below=64),  # Below the context: the 64-token rows.
    'max_length': ints(at_least=2, below=257),  # At most the model's context.
    'log_samples': NOT_BOOL,
    'seed': ints(at_least=0, below=2**32),
    'step': ints(also=(-1, 0, 1, 3, 5)).filter(lambda v: v not in ('2', '4')),
    'workdir': paths('missing', 'empty_dir', 'text'),
    'task': st.one_of(paths('missing', 'empty_dir', 'binary'),
                      WORDS.filter(lambda s: s not in ('arithmetic', 'arithmetic_choice',
                                                       'stdlib_perplexity'))),
    'chat': NOT_BOOL,
    'kv_cache_dtype': choices('', 'int8'),
}
GOOD_FLAGS = {
    'sample': ['--prompt=def f(', '--max_new_tokens=4', '--seed=0', '--temperature=0'],
    'evaluate': ['--task=arithmetic', '--limit=2', '--batch_size=4', '--max_new_tokens=4'],
}


@pytest.mark.parametrize('module, flag', [('sample', flag) for flag in sorted(SAMPLE_FLAGS)]
                         + [('evaluate', flag) for flag in sorted(EVALUATE_FLAGS)])
@hypothesis.settings(max_examples=5, **SETTINGS)
@hypothesis.given(data=st.data())
def test_a_bad_sample_or_evaluate_flag_is_named_in_one_line_and_the_run_is_untouched(
    module, flag, data, commands, run, bad_paths):
  value = data.draw((SAMPLE_FLAGS if module == 'sample' else EVALUATE_FLAGS)[flag], label='value')
  before = snapshot(run['workdir'])
  flags = [f'--workdir={run["workdir"]}', *GOOD_FLAGS[module], fill(f'--{flag}={value}', bad_paths)]
  assert_refused(f'{module} flag', commands(f'experiments.{module}', *flags), (f'--{flag}',),
                 run['workdir'], before)


# Corrupt lines: JSON-lines data, evaluation tasks.

CORRUPT_LINES = st.sampled_from([
    b'\xff\xfe not utf-8\n', b'{"text": "unfinished\n', b'[1, 2, 3]\n', b'"a string"\n',
    b'{"other": "no text field"}\n', b'{"text": null}\n', b'{"text": 7}\n',
    b'{"text": ["a", "list"]}\n', b'not json at all\n', b'{"text": "a" "b"}\n'])


@st.composite
def corrupt_files(draw):
  """([(line, whether it is corrupt)] of a JSON-lines file, the 1-based numbers of the
  corrupt ones)."""
  lines = [(json.dumps({'text': f'record {i}: ' + 'word ' * 20}).encode() + b'\n', False)
           for i in range(draw(st.integers(5, 40)))]
  for _ in range(draw(st.integers(1, 3))):
    lines.insert(draw(st.integers(0, len(lines))), (draw(CORRUPT_LINES), True))
  return lines, [number for number, (_, bad) in enumerate(lines, 1) if bad]


@hypothesis.settings(max_examples=25, **SETTINGS)
@hypothesis.given(case=corrupt_files())
def test_a_corrupt_data_line_is_named_by_file_and_line_before_anything_is_written(
    case, commands, run, tmp_path_factory):
  lines, bad = case
  root = tmp_path_factory.mktemp('corrupt_data')
  data = root / 'data.jsonl'
  data.write_bytes(b''.join(line for line, _ in lines))
  workdir = root / 'run'
  flags = [flag for flag in run['flags'] if not flag.startswith(('--workdir', '--config.data.'))]
  result = commands('experiments.train', *flags, f'--workdir={workdir}',
                    '--config.data.source=jsonl', f'--config.data.path={data}',
                    '--config.data.validation_fraction=0.25')
  # Nothing written: the workdir is not even made.
  culprits = [f'{data}:{number}{end}' for number in bad for end in ' :']
  assert_refused('data line', result, culprits, str(workdir), {})


@hypothesis.settings(max_examples=20, **SETTINGS)
@hypothesis.given(case=corrupt_files(), kind=st.sampled_from(['multiple_choice', 'generation']))
def test_a_corrupt_task_line_is_named_by_file_and_line_and_the_run_is_untouched(
    case, kind, commands, run, tmp_path_factory):
  lines, bad = case
  good = (json.dumps({'context': '1+1=', 'choices': ['2', '3'], 'answer': 0}) if kind ==
          'multiple_choice' else json.dumps({'prompt': '1+1=', 'answer': '2'})).encode() + b'\n'
  task = tmp_path_factory.mktemp('corrupt_task') / 'task.jsonl'
  task.write_bytes(b''.join(line if bad else good for line, bad in lines))
  before = snapshot(run['workdir'])
  result = commands('experiments.evaluate', f'--workdir={run["workdir"]}', f'--task={task}',
                    '--limit=2')
  culprits = [f'{task}:{number}{end}' for number in bad for end in ' :']
  assert_refused('task line', result, culprits, run['workdir'], before)


# Corrupt checkpoint files.

def corrupt(path: str, how: str, rng: random.Random) -> None:
  if how == 'delete':
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  elif how == 'truncate':
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      f.truncate(rng.randrange(size) if size else 0)
  elif how == 'flip':
    with open(path, 'r+b') as f:
      data = bytearray(f.read())
      if data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
      f.seek(0)
      f.write(data)


@st.composite
def checkpoint_corruptions(draw):
  return (draw(st.integers(0, 10**6)), draw(st.sampled_from(['delete', 'truncate', 'flip'])),
          draw(st.randoms(use_true_random=False)))


def corrupted_copy(run, destination, case) -> str:
  """A copy of the run with one file or item of its latest checkpoint corrupted; returns
  the corrupted path."""
  index, how, rng = case
  shutil.copytree(run['workdir'], destination)
  latest = os.path.join(destination, 'checkpoints', '4')
  targets = sorted(os.path.join(parent, name) for parent, dirs, files in os.walk(latest)
                   for name in dirs + files)
  if how != 'delete':
    targets = [path for path in targets if os.path.isfile(path)]
  target = targets[index % len(targets)]
  corrupt(target, how, rng)
  return target


@pytest.fixture(scope='module')
def clean_sample(commands, run):
  result = commands('experiments.sample', f'--workdir={run["workdir"]}', *GOOD_FLAGS['sample'])
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


@hypothesis.settings(max_examples=12, **SETTINGS)
@hypothesis.given(case=checkpoint_corruptions())
def test_sample_from_a_corrupt_checkpoint_is_exact_or_names_it(
    case, commands, run, clean_sample, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('corrupt_sample') / 'run')
  target = corrupted_copy(run, workdir, case)
  before = snapshot(workdir)
  result = commands('experiments.sample', f'--workdir={workdir}', *GOOD_FLAGS['sample'])
  COUNTS['checkpoint file (sample)'][0] += 1
  returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
  assert 'Traceback' not in stdout + stderr, (target, stderr[-3000:])
  OUTCOMES['checkpoint file (sample)']['same sample' if returncode == 0 else 'refused'] += 1
  if returncode == 0:
    assert stdout == clean_sample, target
  else:
    assert_refused(None, result,
                   (os.path.join(workdir, 'checkpoints', '4'),), workdir, before)
  assert snapshot(workdir) == before
  COUNTS['checkpoint file (sample)'][1] += 1


@pytest.fixture(scope='module')
def clean_continuations(commands, run, tmp_path_factory):
  """{resumed step: fingerprint of step 6} for the intact run resumed to 6 steps from its
  step 4, and from its step 2 (with 4 gone). The learning rate's schedule spans num_steps,
  so the two differ."""
  flags = without_workdir(run['flags'])
  fingerprints = {}
  for resumed in (4, 2):
    workdir = str(tmp_path_factory.mktemp('clean_continuation') / 'run')
    shutil.copytree(run['workdir'], workdir)
    if resumed == 2:
      shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
    result = commands('experiments.train', *flags, f'--workdir={workdir}',
                      '--config.train.num_steps=6')
    assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(workdir, 'checkpoints', '6', 'fingerprint', 'metadata')) as f:
      fingerprints[resumed] = json.load(f)
  assert fingerprints[4] != fingerprints[2]
  return fingerprints


@hypothesis.settings(max_examples=6, **SETTINGS)
@hypothesis.given(case=checkpoint_corruptions())
def test_training_sets_a_corrupt_checkpoint_aside_and_resumes_exactly(
    case, commands, run, clean_continuations, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('corrupt_train') / 'run')
  target = corrupted_copy(run, workdir, case)
  step_2 = snapshot(os.path.join(workdir, 'checkpoints', '2'))
  corrupted = snapshot(os.path.join(workdir, 'checkpoints', '4'))
  flags = without_workdir(run['flags'])
  COUNTS['checkpoint file (train)'][0] += 1
  result = commands('experiments.train', *flags, f'--workdir={workdir}',
                    '--config.train.num_steps=6')
  returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
  assert returncode == 0 and 'Traceback' not in stdout + stderr, (target, stderr[-3000:])
  set_aside = os.path.join(workdir, 'set_aside', '4')
  if os.path.exists(set_aside):  # Moved whole, and said so in one line.
    assert snapshot(set_aside) == corrupted
    assert sum(f'moved to {set_aside}' in line for line in stderr.splitlines()) == 1, stderr
  with open(os.path.join(workdir, 'checkpoints', '6', 'fingerprint', 'metadata')) as f:
    resumed = 2 if os.path.exists(set_aside) else 4
    OUTCOMES['checkpoint file (train)'][f'resumed from step {resumed}'] += 1
    assert json.load(f) == clean_continuations[resumed], (target, resumed)
  assert snapshot(os.path.join(workdir, 'checkpoints', '2')) == step_2
  COUNTS['checkpoint file (train)'][1] += 1


# The other entry points' flags: convert (both ways), merge, train_tokenizer, lm_eval's
# --model_args ({new}: a new directory each time; the rest of lm_eval's flags are the
# harness's, and its one line for an unknown task is in test_lm_eval_harness.py).

OTHER_COMMANDS = {  # (module, good flags, {flag: bad values})
    'convert --to_hf': ('convert', ['--to_hf', '--workdir={run}', '--output={new}'], {
        'workdir': paths('missing', 'empty_dir', 'text'),
        'step': ints(also=(-1, 0, 1, 3, 5)).filter(lambda v: v not in ('2', '4')),
        'output': paths('text', 'run', 'link')}),
    'convert --from_hf': ('convert', ['--workdir={new}'], {
        'from_hf': paths('missing', 'empty_dir', 'text')}),
    'convert --to_gguf': ('convert', ['--workdir={run}', '--to_gguf={new}',
                                      '--gguf_type=f32'], {
        'workdir': paths('missing', 'empty_dir', 'text'),
        'step': ints(also=(-1, 0, 1, 3, 5)).filter(lambda v: v not in ('2', '4')),
        'to_gguf': paths('text', 'run', 'link'),
        'gguf_type': choices('f32', 'f16', 'q8_0', 'q4_0')}),
    'quantize': ('quantize', ['--workdir={run}', '--output={new}', '--scheme=int8'], {
        'workdir': paths('missing', 'empty_dir', 'text'),
        'step': ints(also=(-1, 0, 1, 3, 5)).filter(lambda v: v not in ('2', '4')),
        'output': paths('text', 'run', 'link'),
        'scheme': choices('int8', 'int4'),
        'group_size': ints(at_least=1)}),
    'merge': ('merge', ['--workdir={run}', '--output={new}'], {
        'workdir': paths('missing', 'empty_dir', 'text'),
        'output': paths('text', 'run', 'link')}),
    'train_tokenizer': ('train_tokenizer', ['--config=experiments/configs/default.py:tiny',
                                            '--config.data.source=text',
                                            '--config.data.path={corpus}',
                                            '--config.data.validation_fraction=0.25',
                                            '--output={new}'], {
        'vocab_size': ints(at_least=261, below=2**20 + 1),
        'max_documents': ints(at_least=1),
        'output': paths('text', 'empty_dir', 'link')}),
    'lm_eval': ('lm_eval', ['--model', 'lm', '--model_args=workdir={run}', '--tasks',
                            'arithmetic'], {
        'model_args': st.one_of(WORDS.map(lambda word: f'workdir={{run}},{word}_bogus=1'),
                                st.just('step=2'))}),
}


@pytest.fixture(scope='module')
def other_paths(bad_paths, trained_run, tmp_path_factory):
  """bad_paths, with {corpus} and {link} (a link to a new directory)."""
  root = tmp_path_factory.mktemp('other_paths')
  os.symlink(root / 'elsewhere', root / 'link')
  return {**bad_paths, 'corpus': trained_run['corpus'], 'link': str(root / 'link')}


def fill_new(flag: str, paths: dict) -> str:
  os.makedirs(paths['fresh'], exist_ok=True)  # A new file's directory (--to_gguf's).
  return fill(flag.replace('{new}', os.path.join(paths['fresh'], os.urandom(6).hex())), paths)


def test_the_other_commands_good_flags_run(commands, other_paths):
  """So that below the bad value, not the rest, is refused (train_tokenizer's with a small
  vocabulary; merge's run has no adapters, so it is refused for that, naming --workdir;
  convert --from_hf imports a good checkpoint in test_convert.py, and lm_eval runs the
  harness in test_lm_eval_harness.py)."""
  for name, (module, good, _) in OTHER_COMMANDS.items():
    if name in ('convert --from_hf', 'lm_eval'):  # lm_eval: test_lm_eval_harness.py.
      continue
    extra = ['--vocab_size=300'] if module == 'train_tokenizer' else []
    result = commands(f'experiments.{module}', *[fill_new(flag, other_paths) for flag in good],
                      *extra)
    if module == 'merge':
      assert result.returncode == 1 and 'nothing to merge' in result.stderr, result.stderr[-2000:]
    else:
      assert result.returncode == 0, (name, result.stderr[-3000:])


@pytest.mark.parametrize('name, flag', [(name, flag) for name, (_, _, bad) in
                                        OTHER_COMMANDS.items() for flag in sorted(bad)])
@hypothesis.settings(max_examples=3, **SETTINGS)
@hypothesis.given(data=st.data())
def test_a_bad_flag_of_another_command_is_named_in_one_line_and_the_run_is_untouched(
    name, flag, data, commands, run, other_paths):
  module, good, bad = OTHER_COMMANDS[name]
  value = fill_new(data.draw(bad[flag], label='value'), other_paths)
  flags = [f for f in (fill_new(f, other_paths) for f in good)
           if not f.startswith(f'--{flag}=')] + [f'--{flag}={value}']
  before = snapshot(run['workdir'])
  assert_refused(f'{name} flag', commands(f'experiments.{module}', *flags), (f'--{flag}',),
                 run['workdir'], before)
  assert not os.path.lexists(os.path.join(other_paths['link'], '..', 'elsewhere'))


# Links planted in a run's directory: every file a command writes there would go through
# them, outside.

WORKDIR_ENTRIES = ('lock', 'metrics.jsonl', 'tensorboard', 'eval', 'set_aside', 'checkpoints',
                   'checkpoints/4', 'checkpoints/4/state', 'eval/step_4.json')


@hypothesis.settings(max_examples=12, **SETTINGS)
@hypothesis.given(entry=st.sampled_from(WORKDIR_ENTRIES),
                  module=st.sampled_from(['train', 'evaluate']),
                  dangling=st.booleans())
def test_a_link_in_the_workdir_is_named_and_nothing_is_written_through_it(
    entry, module, dangling, commands, run, tmp_path_factory):
  root = tmp_path_factory.mktemp('linked')
  workdir = root / 'run'
  shutil.copytree(run['workdir'], workdir, symlinks=True)
  link = workdir / entry
  outside = root / 'outside'
  if not dangling:  # What the entry is, elsewhere: a run would write into it.
    if link.is_dir():
      shutil.copytree(link, outside)
    elif link.exists():
      shutil.copy(link, outside)
    else:
      outside.write_text('precious\n')
  if link.is_dir():
    shutil.rmtree(link)
  elif link.exists():
    link.unlink()
  link.parent.mkdir(parents=True, exist_ok=True)
  os.symlink(outside, link)
  before, outside_before = snapshot(str(workdir)), snapshot(str(root))
  flags = ([*without_workdir(run['flags']), '--config.train.num_steps=6'] if module == 'train'
           else GOOD_FLAGS['evaluate'])
  result = commands(f'experiments.{module}', *flags, f'--workdir={workdir}')
  assert_refused('workdir link', result, (f'{link} is a symbolic link',), str(workdir), before)
  assert snapshot(str(root)) == outside_before


# Chat templates: a checkpoint's program, run on every conversation.

BAD_TEMPLATES = [
    '{{ 1 // 0 }}', '{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}',
    '{{ range(10**9) | list }}', '', '{% if false %}x{% endif %}', '{% for m in messages %}',
    "{{ 'x' * 10**10 }}", "{{ raise_exception('roles must alternate') }}", '{{ [] + 1 }}',
    '{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}']


@hypothesis.settings(max_examples=5, **SETTINGS)
@hypothesis.given(template=st.sampled_from(BAD_TEMPLATES))
def test_a_chat_template_that_fails_is_named_by_its_file_in_one_line(
    template, commands, run, tmp_path_factory):
  """SFT on conversations with a Hugging Face tokenizer (the byte tokenizer's, as
  tokenizer.json) whose chat_template.jinja fails, loops past its time or builds past
  its size: named before anything is written."""
  from lm.interop import hf_tokenizer  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('template')
  tokenizer = root / 'tokenizer'
  tokenizer.mkdir()
  (tokenizer / 'tokenizer.json').write_text(hf_tokenizer.byte_tokenizer_json())
  (tokenizer / 'tokenizer_config.json').write_text(json.dumps(
      {'bos_token': '<s>', 'eos_token': '</s>', 'pad_token': '<pad>'}))
  (tokenizer / 'chat_template.jinja').write_text(template)
  flags = [flag for flag in run['flags'] if not flag.startswith(('--workdir', '--config.data.'))]
  result = commands('experiments.train', *flags, f'--workdir={root / "run"}',
                    '--config.train.objective=sft', '--config.data.source=stdlib_chats',
                    '--config.tokenizer.kind=huggingface', f'--config.tokenizer.path={tokenizer}')
  assert_refused('chat template', result, (str(tokenizer / 'chat_template.jinja'),),
                 str(root / 'run'), {})
