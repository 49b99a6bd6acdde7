"""Bad evaluation task files end in one line naming the file:line and the field, at load;
evaluation results add up across runs; params that are not finite are named
(checkpointing.check_finite, which every reader of a checkpoint calls)."""

import json
import re

import numpy as np
import pytest

from lm.errors import ConfigError
from lm.evaluation import harness, results, scoring, tasks
from lm.training import checkpointing


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
    checkpointing.check_finite(params, '--workdir=/runs/a', 7)
  params['head']['kernel'][0, 1] = 2.0
  checkpointing.check_finite(params, '--workdir=/runs/a', 7)
