"""Bad input to `experiments.sample`, `experiments.evaluate` and evaluation task files ends
in one line naming the flag, field or file:line, with no traceback; what needs no
checkpoint is refused before one is loaded. Evaluation results add up across runs."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lm.errors import ConfigError
from lm.evaluation import harness, inputs, results, scoring, tasks
from lm.training import checkpointing

from helpers import ROOT, cpu_subprocess_env



def run(module, *flags):
  return subprocess.run([sys.executable, '-m', f'experiments.{module}', *flags], cwd=ROOT,
                        env=cpu_subprocess_env(), capture_output=True, text=True, timeout=300)


def error_line(result) -> str:
  """The line a refused command ends with, after checking it failed without a traceback."""
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return result.stderr.strip().splitlines()[-1]


def test_sample_names_the_workdir_and_every_bad_flag_in_one_line_without_a_checkpoint(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  line = error_line(run('sample', f'--workdir={a_file}', '--prompt=x', '--max_new_tokens=0',
                        '--temperature=nan', '--top_p=1.5', '--top_k=-1'))
  for named in (f'--workdir={a_file} is a file', '--max_new_tokens=0', '--temperature=nan',
                '--top_p=1.5', '--top_k=-1'):
    assert named in line, line


def test_evaluate_names_the_workdir_and_every_bad_flag_in_one_line_without_a_checkpoint(
    tmp_path):
  missing = tmp_path / 'missing'
  line = error_line(run('evaluate', f'--workdir={missing}', '--task=arithmetic', '--limit=0',
                        '--batch_size=-1', '--num_shots=-1', '--self_consistency=0',
                        '--max_new_tokens=-2', '--temperature=nan'))
  for named in (f'--workdir={missing} does not exist', '--limit=0', '--batch_size=-1',
                '--num_shots=-1', '--self_consistency=0', '--max_new_tokens=-2',
                '--temperature=nan'):
    assert named in line, line


def test_sample_and_evaluate_name_the_other_bad_workdirs_and_flag_values(tmp_path):
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


def test_sample_names_the_line_of_a_binary_prompts_file(tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_bytes(b'a fine prompt\n\x89PNG\r\n\x1a\n\x00\xff\n')
  line = error_line(run('sample', f'--workdir={tmp_path}', f'--prompts_file={prompts}'))
  assert line.startswith(f'error: --prompts_file={prompts}:2 is not UTF-8 text'), line


GOOD_RECORDS = {
    'perplexity': '{"text": "fine"}',
    'multiple_choice': '{"context": "c", "choices": [" a", " b"], "answer": 0}',
    'generation': '{"prompt": "p", "answer": " a"}',
}
CHOICES = '"choices" must be a list of at least 2 non-empty strings'
GENERATION_ANSWER = '"answer" must be a string or a number'


@pytest.mark.parametrize('record,message', [
    ('{"text": 5}', '"text" must be a string'),
    ('{"text": null}', '"text" must be a string'),
    ('{"context": 3, "choices": [" a", " b"], "answer": 0}', '"context" must be a string'),
    ('{"context": "c", "choices": [" a", 7], "answer": 0}', CHOICES),
    ('{"context": "c", "choices": [" a", ""], "answer": 0}', CHOICES),  # "" would always win.
    ('{"context": "c", "choices": [" a", " b"], "answer": true}',
     '"answer" must be an index into "choices"'),
    ('{"prompt": ["p"], "answer": " a"}', '"prompt" must be a string'),
    ('{"prompt": "p", "answer": true}', GENERATION_ANSWER),
    ('{"prompt": "p", "answer": [1]}', GENERATION_ANSWER),
    ('{"prompt": "p", "answer": {"a": 1}}', GENERATION_ANSWER),
    ('{"prompt": "p", "answer": null}', GENERATION_ANSWER),
])
def test_task_fields_of_the_wrong_type_are_refused_at_load_naming_file_line_and_field(
    tmp_path, record, message):
  path = tmp_path / 'bad.jsonl'
  path.write_text(GOOD_RECORDS[tasks.kind_of(json.loads(record), 'here')] + '\n' + record + '\n')
  with pytest.raises(ConfigError, match=re.escape(f'{path}:2: {message}')):
    tasks.load(str(path))


def test_number_answers_of_a_generation_task_are_compared_and_shown_as_text(tmp_path):
  path = tmp_path / 'numbers.jsonl'
  path.write_text('{"prompt": "Q: 2 + 2?\\nA: ", "answer": 4}\n'
                  '{"prompt": "Q: 1 / 2?\\nA: ", "answer": 0.5}\n')
  task = tasks.load(str(path))
  assert [record['answer'] for record in task.records] == ['4', '0.5']

  class Completions:
    def complete(self, prompts, *, max_new_tokens, temperature, seed):
      assert prompts[0].startswith('Q: 1 / 2?\nA: 0.5\n\n')  # The other example, solved.
      return [scoring.Completion('4'), scoring.Completion('0.5')]

  assert harness.evaluate(task, Completions(), num_shots=1)['exact_match'] == 1.0


def test_a_task_line_that_is_not_utf8_is_named(tmp_path):
  path = tmp_path / 'latin1.jsonl'
  path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(ConfigError, match=re.escape(f'--task={path}:2 is not UTF-8 text')):
    tasks.load(str(path))


@pytest.mark.parametrize('line', [
    '{"text": ',
    '{"text": "x", "n": ' + '9' * 5000 + '}',  # Python refuses ints this long: ValueError.
    '[' * 100_000,  # RecursionError.
])
def test_a_task_line_that_is_not_json_is_named(tmp_path, line):
  path = tmp_path / 'broken.jsonl'
  path.write_text('{"text": "fine"}\n' + line + '\n')
  with pytest.raises(ConfigError, match=re.escape(f'{path}:2 is not valid JSON')):
    tasks.load(str(path))


def test_saving_results_again_for_a_step_replaces_only_the_tasks_run_again(tmp_path):
  path = tmp_path / 'eval' / 'step_2.json'
  path.parent.mkdir()
  path.write_text(json.dumps({  # As evaluate wrote it before results carried settings.
      'step': 2, 'settings': {'num_shots': 1},
      'results': {'a': {'kind': 'perplexity', 'loss': 1.0},
                  'b': {'kind': 'multiple_choice', 'accuracy': 0.25}}}))
  results.save(str(path), 2, {'b': {'kind': 'multiple_choice', 'accuracy': 0.5},
                              'c': {'kind': 'generation', 'exact_match': 1.0}},
               settings={'num_shots': 3})
  written = json.loads(path.read_text())
  assert written['results'] == {
      'a': {'kind': 'perplexity', 'loss': 1.0, 'settings': {'num_shots': 1}},
      'b': {'kind': 'multiple_choice', 'accuracy': 0.5, 'settings': {'num_shots': 3}},
      'c': {'kind': 'generation', 'exact_match': 1.0, 'settings': {'num_shots': 3}}}


def test_params_with_a_nan_or_inf_are_refused_naming_the_workdir_and_step():
  params = {'embed': {'embedding': np.ones((3, 2), np.float32)},
            'head': {'kernel': np.array([[1.0, np.inf]], np.float32)}}
  with pytest.raises(ConfigError, match=re.escape(
      '--workdir=/runs/a: the params of step 7 are not finite (NaN or Inf), e.g. head/kernel')):
    inputs.check_finite_params(params, '/runs/a', 7)
  params['head']['kernel'][0, 1] = 2.0
  inputs.check_finite_params(params, '/runs/a', 7)


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


def test_sample_and_evaluate_refuse_a_checkpoint_with_non_finite_params(non_finite_workdir):
  workdir, step = non_finite_workdir
  for module, flags in (('sample', ['--prompt=x', '--max_new_tokens=2']),
                        ('evaluate', ['--task=arithmetic', '--limit=2'])):
    line = error_line(run(module, f'--workdir={workdir}', *flags))
    assert line.startswith(f'error: --workdir={workdir}: the params of step {step} are not'
                           ' finite'), line


def test_sample_refuses_a_top_k_above_the_vocabulary_after_loading(pretrained):
  line = error_line(run('sample', f'--workdir={pretrained[0]}', '--prompt=x', '--top_k=100000',
                        '--max_new_tokens=2'))
  assert line.startswith('error: --top_k=100000 exceeds the vocabulary'), line


def test_evaluate_merges_results_and_prints_them_when_it_cannot_write_them(pretrained,
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
