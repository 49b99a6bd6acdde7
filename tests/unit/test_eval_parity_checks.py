"""The checks of experiments/eval_parity.py, without running the three ways: its records
are longer than the context where truncation is checked, GSM8K's answers are extracted as
the harness's config does, and a moved number, a prompt or a stop string unlike the
harness's is reported. (tests/integration/test_eval_parity.py runs them.)"""

import json
import os

import pytest
import yaml

lm_eval = pytest.importorskip('lm_eval')  # In the test extra; skipped only without it.

from experiments import eval_parity  # noqa: E402 (sets the harness offline first)
from lm.evaluation import benchmarks  # noqa: E402

HARNESS_TASKS = os.path.join(os.path.dirname(os.path.abspath(lm_eval.__file__)), 'tasks')


@pytest.fixture(scope='module')
def task_files(tmp_path_factory):
  return eval_parity.write_tasks(str(tmp_path_factory.mktemp('tasks')))


def test_the_records_are_longer_than_the_context_where_truncation_is_checked(
    task_files, tmp_path):
  """MMLU's 5-shot prompts and GSM8K's 8-shot ones do not fit (GSM8K's keeps 320 - 256
  tokens), nor do two perplexity documents; HellaSwag's and ARC's exceed 128 tokens."""
  import transformers  # pylint: disable=import-outside-toplevel
  hf_dir = eval_parity.write_checkpoint(str(tmp_path), 'llama',
                                        eval_parity.task_texts(task_files))
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  count = lambda text: len(tokenizer(text).input_ids)
  specs = eval_parity.lm_task_specs(task_files)
  contexts = {kind: [r.get('context', r.get('prompt'))
                     for r in benchmarks.load(specs[kind]).records]
              for kind in ('mmlu', 'hellaswag', 'arc', 'gsm8k')}
  limit = eval_parity.MAX_POSITION_EMBEDDINGS
  assert min(map(count, contexts['mmlu'])) > limit
  assert min(map(count, contexts['gsm8k'])) > limit
  assert min(map(count, contexts['hellaswag'] + contexts['arc'])) > 128
  with open(task_files['perplexity']) as f:
    lengths = [count(json.loads(line)['text']) for line in f]
  assert sum(length > limit for length in lengths) >= 2 and max(lengths) > 2 * limit


def test_gsm8k_answers_are_extracted_and_matched_as_the_harness_config_does():
  """lm's strict and flexible answers and their exact match, against the harness's own
  filters and metric built from its installed gsm8k-cot.yaml; and its stops and shots."""
  from lm_eval.api.metrics import exact_match_hf_evaluate  # pylint: disable=import-outside-toplevel
  from lm_eval.filters.extraction import RegexFilter  # pylint: disable=import-outside-toplevel
  with open(os.path.join(HARNESS_TASKS, 'gsm8k', 'gsm8k-cot.yaml')) as f:
    config = yaml.safe_load(f)
  filters = {entry['name']: RegexFilter(**{k: v for k, v in entry['filter'][0].items()
                                           if k != 'function'})
             for entry in config['filter_list']}
  metric = {k: v for k, v in config['metric_list'][0].items()
            if k in ('regexes_to_ignore', 'ignore_case', 'ignore_punctuation')}
  cases = [  # (completion, reference)
      (' 3 + 4 = 7. The answer is 7.\n\n', '7'),
      ('Total: 1,234 apples. The answer is 1,234.', '1,234'),
      ('The answer is 5', '5'),  # Nothing after N: strict finds none.
      ('The answer is 5\nQ', '5'),  # Nor with a newline after it.
      ('So 5 - 7 = -2 degrees.\n#### -2', '-2'),
      ('It costs \\boxed{42} dollars', '42'),
      ('The answer is $18.', '18'),
      ('Each is $1,200, so 2 x 1,200 = $2,400.', '2,400'),
      ('The answer is -3.5 degrees. Then 4.', '-3.5'),
      ('The answer is ,. or 12', '12'),
      ('No numbers here.', '3'),
  ]
  for completion, reference in cases:
    for name, extract in (('strict-match', benchmarks.strict_answer),
                          ('flexible-extract', benchmarks.flexible_answer)):
      theirs = filters[name].apply([[completion]], [None])[0][0]
      assert extract(completion) == theirs, (name, completion)
      matched = exact_match_hf_evaluate([theirs], [reference], **metric)['exact_match'] == 1.0
      assert (benchmarks.normalize_number(extract(completion))
              == benchmarks.normalize_number(reference)) == matched, (name, completion)
  assert set(benchmarks.GSM8K_STOPS) == set(config['generation_kwargs']['until'])
  assert [tuple(s.values()) for s in config['fewshot_config']['samples']] == list(
      benchmarks.GSM8K_EXEMPLARS)


def test_the_check_fails_on_a_moved_log_likelihood_a_metric_or_a_completion():
  Result = eval_parity.Result
  choices = {'hf': Result({'acc,none': 0.5}, [[-1.0, -2.0], [-3.0, -4.0]])}
  assert not eval_parity.failures('mmlu', {**choices, 'lm': choices['hf'],
                                           'lm_harness': choices['hf']})
  moved = Result({'acc,none': 0.5}, [[-1.0, -2.0], [-3.0, -4.0002]])
  assert eval_parity.failures('mmlu', {**choices, 'lm': moved, 'lm_harness': choices['hf']})
  assert eval_parity.failures('mmlu', {**choices, 'lm': Result({'acc,none': 1.0}, moved.records),
                                       'lm_harness': None})
  documents = {'hf': Result({'log_likelihood': -5000.0}, [-5000.0])}
  within_float32 = Result({'log_likelihood': -5000.0005}, [-5000.0005])
  assert not eval_parity.failures('perplexity', {**documents, 'lm': within_float32,
                                                 'lm_harness': within_float32})
  past_it = Result({'log_likelihood': -5000.01}, [-5000.01])
  assert eval_parity.failures('perplexity', {**documents, 'lm': past_it, 'lm_harness': past_it})
  texts = {'hf': Result({'exact_match,strict-match': 0.0, 'exact_match,flexible-extract': 0.0},
                        [' 1 + 1 = 2.', ' 2'])}
  other = Result(texts['hf'].metrics, [' 1 + 1 = 2.', ' 2\n'])
  assert eval_parity.failures('gsm8k', {**texts, 'lm': other, 'lm_harness': texts['hf']})


def test_a_prompt_or_stop_string_unlike_the_harnesss_is_reported(task_files):
  specs = eval_parity.lm_task_specs(task_files)
  arc, gsm8k = benchmarks.load(specs['arc']), benchmarks.load(specs['gsm8k'])
  output = {'samples': {
      eval_parity.harness_task_name('arc'): [
          {'doc_id': i, 'arguments': [[r['context'], ' ' + c] for c in r['choices']]}
          for i, r in enumerate(arc.records)],
      eval_parity.harness_task_name('gsm8k'): [
          {'doc_id': i, 'arguments': [[r['prompt'], {'until': ['Q:', '</s>', '<|im_end|>']}]]}
          for i, r in enumerate(gsm8k.records)]}}
  assert not eval_parity.prompt_differences('arc', specs['arc'], output)
  assert not eval_parity.prompt_differences('gsm8k', specs['gsm8k'], output)
  first = output['samples'][eval_parity.harness_task_name('arc')][0]['arguments'][0]
  first[0] = first[0].replace('\nAnswer:', '\nA:')
  [found] = eval_parity.prompt_differences('arc', specs['arc'], output)
  assert found.startswith('arc record 0: lm builds ') and found.endswith("?\\nA:'")
  assert "?\\nAnswer:' where the harness has '" in found
  output['samples'][eval_parity.harness_task_name('gsm8k')][1]['arguments'][0][1] = {
      'until': ['Q:', '\n\n']}
  assert eval_parity.prompt_differences('gsm8k', specs['gsm8k'], output) == [
      "gsm8k record 1: lm builds ['Q:', '</s>', '<|im_end|>'] where the harness has"
      " ['Q:', '\\n\\n']"]
