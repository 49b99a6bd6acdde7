"""Bad input to `experiments.sample` and `experiments.evaluate` ends in one line naming the
flag or file:line, with no traceback; what needs no checkpoint is refused before one is
loaded. Evaluation results add up across runs, or are printed when they cannot be written.
(The commands run through conftest's `commands`.)"""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lm.training import checkpointing


@pytest.fixture
def run(commands):
  return lambda module, *flags: commands(f'experiments.{module}', *flags)


def error_line(result) -> str:
  """The line a refused command ends with, after checking it failed without a traceback."""
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return result.stderr.strip().splitlines()[-1]


def test_sample_names_the_workdir_and_every_bad_flag_in_one_line_without_a_checkpoint(
    run, tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  line = error_line(run('sample', f'--workdir={a_file}', '--prompt=x', '--max_new_tokens=0',
                        '--temperature=nan', '--top_p=1.5', '--top_k=-1'))
  for named in (f'--workdir={a_file} is a file', '--max_new_tokens=0', '--temperature=nan',
                '--top_p=1.5', '--top_k=-1'):
    assert named in line, line


def test_evaluate_names_the_workdir_and_every_bad_flag_in_one_line_without_a_checkpoint(
    run, tmp_path):
  missing = tmp_path / 'missing'
  line = error_line(run('evaluate', f'--workdir={missing}', '--task=arithmetic', '--limit=0',
                        '--batch_size=-1', '--num_shots=-1', '--self_consistency=0',
                        '--max_new_tokens=-2', '--temperature=nan'))
  for named in (f'--workdir={missing} does not exist', '--limit=0', '--batch_size=-1',
                '--num_shots=-1', '--self_consistency=0', '--max_new_tokens=-2',
                '--temperature=nan'):
    assert named in line, line


def test_sample_and_evaluate_name_the_other_bad_workdirs_and_flag_values(run, tmp_path):
  a_file, missing = tmp_path / 'a_file', tmp_path / 'missing'
  a_file.write_text('')
  line = error_line(run('sample', f'--workdir={missing}', '--prompt=x', '--max_new_tokens=-3',
                        '--temperature=-1', '--top_p=0'))
  for named in (f'--workdir={missing} does not exist', '--max_new_tokens=-3',
                '--temperature=-1', '--top_p=0'):
    assert named in line, line
  line = error_line(run('evaluate', f'--workdir={a_file}', '--task=arithmetic', '--limit=-2',
                        '--batch_size=0', '--max_new_tokens=0', '--temperature=-0.5'))
  for named in (f'--workdir={a_file} is a file', '--limit=-2', '--batch_size=0',
                '--max_new_tokens=0', '--temperature=-0.5'):
    assert named in line, line


def test_sample_names_the_line_of_a_binary_prompts_file(run, tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_bytes(b'a fine prompt\n\x89PNG\r\n\x1a\n\x00\xff\n')
  line = error_line(run('sample', f'--workdir={tmp_path}', f'--prompts_file={prompts}'))
  assert line.startswith(f'error: --prompts_file={prompts}:2 is not UTF-8 text'), line


def test_sample_names_a_prompt_that_is_not_utf8_and_an_empty_prompts_file(run, tmp_path):
  # Bytes that are not UTF-8 (as $'\\xff' gives) reach argv as a lone surrogate.
  line = error_line(run('sample', f'--workdir={tmp_path}', '--prompt=a \udcff'))
  assert line == "error: --prompt holds '\\udcff', a lone surrogate, which is not UTF-8 text", line
  empty = tmp_path / 'prompts.txt'
  empty.write_text('\n  \n')
  line = error_line(run('sample', f'--workdir={tmp_path}', f'--prompts_file={empty}'))
  assert line == f'error: --prompts_file={empty} holds no prompt (no line that is not blank)', line


@pytest.fixture(scope='module')
def non_finite_workdir(pretrained, tmp_path_factory):
  """A copy of the `pretrained` run whose latest params are all NaN, fingerprint and all
  (as a run saved them before non-finite steps were caught)."""
  workdir = tmp_path_factory.mktemp('non_finite') / 'run'
  shutil.copytree(pretrained[0], workdir)
  step = max(int(name) for name in os.listdir(workdir / 'checkpoints') if name.isdigit())
  path = str(workdir / 'checkpoints' / str(step) / 'state')
  with ocp.PyTreeCheckpointer() as checkpointer:
    state = checkpointer.restore(path)
    state['params'] = jax.tree.map(lambda x: np.full_like(x, np.nan), state['params'])
    checkpointer.save(path, state, force=True)
  fingerprint_file = workdir / 'checkpoints' / str(step) / 'fingerprint' / 'metadata'
  fingerprint = json.loads(fingerprint_file.read_text())
  fingerprint.update({'.params' + name: value for name, value in
                      checkpointing._fingerprint_json(state['params']).items()})
  fingerprint_file.write_text(json.dumps(fingerprint))
  return workdir, step


def test_every_reader_refuses_a_checkpoint_with_non_finite_params(run, non_finite_workdir,
                                                                 tmp_path):
  workdir, step = non_finite_workdir
  for module, flags in (('sample', ['--prompt=x', '--max_new_tokens=2']),
                        ('evaluate', ['--task=arithmetic', '--limit=2']),
                        ('convert', ['--to_hf', f'--output={tmp_path / "hf"}']),
                        ('merge', [f'--output={tmp_path / "merged"}'])):
    line = error_line(run(module, f'--workdir={workdir}', *flags))
    assert line.startswith(f'error: --workdir={workdir}: the params of step {step} are not'
                           ' finite'), (module, line)
  assert not os.listdir(tmp_path)  # Nothing exported or merged.
  # Nor does a run start from it.
  line = error_line(run('train', '--config=experiments/configs/sft.py:tiny',
                        f'--workdir={tmp_path / "sft"}', f'--config.train.init_from={workdir}'))
  assert line.startswith(f"error: config.train.init_from='{workdir}': the params of step"
                         f' {step} are not finite'), line


def test_resuming_sets_a_checkpoint_with_non_finite_params_aside(run, non_finite_workdir,
                                                                 pretrained_config, tmp_path):
  """A run whose latest checkpoint was saved poisoned (before saves were checked) resumes
  from the one before it, instead of failing at every restart."""
  source, step = non_finite_workdir
  workdir = shutil.copytree(source, tmp_path / 'run')
  config = pretrained_config.to_dict()
  result = run('train', '--config=experiments/configs/default.py:tiny', f'--workdir={workdir}',
               '--config.data.source=text', f'--config.data.path={config["data"]["path"]}',
               '--config.data.validation_fraction=0.25', '--config.model.dtype=float32',
               '--config.train.warmup_steps=1', '--config.train.eval_every=2',
               f'--config.train.num_steps={step + 1}', '--config.train.sample_tokens=0')
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f'checkpoint step {step} cannot be read (ValueError: its params are not finite'
          in result.stderr), result.stderr[-3000:]
  assert os.path.isdir(workdir / 'set_aside' / str(step))
  assert max(int(name) for name in os.listdir(workdir / 'checkpoints')
             if name.isdigit()) == step + 1


def test_sample_refuses_a_top_k_above_the_vocabulary_after_loading(run, pretrained):
  line = error_line(run('sample', f'--workdir={pretrained[0]}', '--prompt=x', '--top_k=100000',
                        '--max_new_tokens=2'))
  assert line.startswith('error: --top_k=100000 exceeds the vocabulary'), line


def test_sample_decodes_through_an_int8_cache_on_request(run, pretrained):
  flags = [f'--workdir={pretrained[0]}', '--prompt=the cat', '--max_new_tokens=24',
           '--temperature=0']
  result = run('sample', *flags, '--kv_cache_dtype=int8')
  assert result.returncode == 0, result.stderr[-3000:]
  # Greedy through the int8 cache: near the float cache's logits (tests/unit), and here
  # the same tokens.
  assert result.stdout == run('sample', *flags).stdout


def test_evaluate_merges_results_and_prints_them_when_it_cannot_write_them(run, pretrained,
                                                                         tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(pretrained[0], workdir)
  step = max(int(name) for name in os.listdir(workdir / 'checkpoints') if name.isdigit())
  path = workdir / 'eval' / f'step_{step}.json'
  path.parent.mkdir()
  path.write_text(json.dumps({'step': step, 'settings': {'num_shots': 0},
                              'results': {'earlier': {'kind': 'perplexity', 'loss': 1.0}}}))
  task = tmp_path / 'colours.jsonl'
  task.write_text('{"context": "the sky is", "choices": [" blue", " red"], "answer": 0}\n')
  result = run('evaluate', f'--workdir={workdir}', f'--task={task}', '--batch_size=2')
  assert result.returncode == 0, result.stderr[-3000:]
  written = json.loads(path.read_text())['results']
  assert sorted(written) == ['colours', 'earlier']
  assert written['colours']['settings']['num_shots'] == 0

  shutil.rmtree(workdir / 'eval')
  (workdir / 'eval').write_text('')  # Unwritable, even for root.
  result = run('evaluate', f'--workdir={workdir}', f'--task={task}', '--batch_size=2')
  assert 'colours' in result.stdout and 'accuracy=' in result.stdout
  assert error_line(result).startswith(f'error: could not write the results to {path}')
