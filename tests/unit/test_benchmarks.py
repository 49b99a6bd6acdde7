"""The field's benchmarks from their published layouts (lm/evaluation/benchmarks.py): the
prompts lm-evaluation-harness renders, its metrics, and bad files named by file:line."""

import csv
import json

import pytest

from lm.errors import ConfigError
from lm.evaluation import benchmarks, harness, scoring

from helpers import ChoicesOneByOne


def write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


def write_csv(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows(rows)


class FakeScorer(ChoicesOneByOne):
  """log-likelihood of a continuation: `scores[(context end, continuation)]`, else -100;
  completions from a list, in order."""

  def __init__(self, scores=None, completions=None):
    self.scores, self.completions, self.calls = scores or {}, completions or [], []

  def continuation_log_likelihoods(self, pairs):
    return [scoring.Score(self.scores.get((context[-12:], continuation), -100.0), 1, False)
            for context, continuation in pairs]

  def complete(self, prompts, *, max_new_tokens, temperature, seed, stops=()):
    self.calls.append((len(prompts), temperature, stops))
    return [scoring.Completion(scoring.cut_at_stops(self.completions.pop(0), stops))
            for _ in prompts]


def mmlu_rows(subject, count, offset=0):
  return [[f'{subject} question {i}?', f'a{i}', f'b{i}', f'c{i}', f'd{i}', 'ABCD'[i % 4]]
          for i in range(offset, offset + count)]


def test_mmlu_csv_renders_the_five_shot_prompt_and_scores_by_subject(tmp_path):
  for subject in ('abstract_algebra', 'anatomy'):
    write_csv(tmp_path / 'dev' / f'{subject}_dev.csv', mmlu_rows(subject, 5))
    write_csv(tmp_path / 'test' / f'{subject}_test.csv', mmlu_rows(subject, 2, offset=10))
  task = benchmarks.load(f'mmlu:{tmp_path}')
  assert task.kind == 'multiple_choice' and len(task.records) == 4
  first = task.records[0]
  shot = lambda i: (f'abstract_algebra question {i}?\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}'
                    f'\nAnswer: {"ABCD"[i % 4]}\n\n')
  assert first['context'] == (
      'The following are multiple choice questions (with answers) about abstract algebra.\n\n'
      + ''.join(shot(i) for i in range(5))
      + 'abstract_algebra question 10?\nA. a10\nB. b10\nC. c10\nD. d10\nAnswer:')
  assert first['choices'] == ['A', 'B', 'C', 'D'] and first['answer'] == 2  # 10 % 4
  # The scorer picks " C" for every question: right for question 10 of each subject
  # (answer C), wrong for 11 (D).
  scores = {(' d10\nAnswer:'[-12:], ' C'): -1.0, (' d11\nAnswer:'[-12:], ' C'): -1.0}
  metrics = harness.evaluate(task, FakeScorer(scores))
  assert metrics['acc'] == 0.5
  assert metrics['acc_by_subject'] == {'abstract_algebra': 0.5, 'anatomy': 0.5}


def test_mmlu_json_lines_give_the_same_prompts_as_the_csv(tmp_path):
  csv_dir, jsonl_dir = tmp_path / 'csv', tmp_path / 'jsonl'
  write_csv(csv_dir / 'dev' / 'virology_dev.csv', mmlu_rows('virology', 5))
  write_csv(csv_dir / 'test' / 'virology_test.csv', mmlu_rows('virology', 3, offset=5))
  jsonl_dir.mkdir()
  for split, rows in (('dev', mmlu_rows('virology', 5)), ('test', mmlu_rows('virology', 3, 5))):
    write_jsonl(jsonl_dir / f'{split}.jsonl', [
        dict(question=r[0], subject='virology', choices=r[1:5], answer='ABCD'.index(r[5]))
        for r in rows])
  assert (benchmarks.load(f'mmlu:{csv_dir}').records
          == benchmarks.load(f'mmlu:{jsonl_dir}').records)


HELLASWAG = dict(ind=4, activity_label='Removing ice from car', ctx_a='Then, the man writes'
                 ' over the snow covering the window of a car, and a woman wearing winter'
                 ' clothes smiles.', ctx_b='then', endings=[
                     ', the man adds wax to the windshield and cuts it.',
                     ', a person board a ski lift, while two men supporting the head of the'
                     ' person wearing winter clothes snow as the we girls sled.',
                     ', the man puts on a christmas coat, knitted with netting.',
                     ', the man continues removing the snow on his car.'], label=3,
                 source_id='activitynet~v_-1IBHYS3L-Y', split='val', split_type='indomain')


def test_hellaswag_query_and_endings_and_acc_norm(tmp_path):
  wikihow = dict(HELLASWAG, activity_label='Home and Garden', ctx_a='[header] How to grow'
                 ' mint [title] Pick a pot.', ctx_b='[step] water it', label='0',
                 endings=['[substeps] Keep  it moist.', 'Burn it.', 'Eat it.', 'Sell it.'])
  short = dict(HELLASWAG, endings=[', he waves.'] + HELLASWAG['endings'][1:])
  task = benchmarks.load(f'hellaswag:{write_jsonl(tmp_path / "h.jsonl", [short, wikihow])}')
  first, second = task.records
  assert first['context'] == ('Removing ice from car: Then, the man writes over the snow'
                              ' covering the window of a car, and a woman wearing winter'
                              ' clothes smiles. Then')
  assert first['choices'][3] == ', the man continues removing the snow on his car.'
  assert first['answer'] == 3
  # capitalize() meets the bracket first, so "water" stays lower case, as there.
  assert second['context'] == 'Home and Garden: How to grow mint. Pick a pot. water it'
  # The bracket goes after the strip, leaving a space, as there.
  assert second['choices'][0] == ' Keep it moist.' and second['answer'] == 0
  # Raw log-likelihood prefers the short wrong ending; per character, the long right one.
  long_right, short_wrong = first['choices'][3], first['choices'][0]
  scores = {(first['context'][-12:], ' ' + long_right): -20.0,
            (first['context'][-12:], ' ' + short_wrong): -15.0}
  metrics = harness.evaluate(task, FakeScorer(scores), limit=1)
  assert metrics['acc'] == 0.0 and metrics['acc_norm'] == 1.0


def test_arc_in_both_published_layouts(tmp_path):
  ai2 = dict(id='Mercury_7175875', question=dict(stem='Which is a gas?', choices=[
      dict(text='ice', label='A'), dict(text='steam', label='B'), dict(text='iron', label='C')]),
      answerKey='B')
  hf = dict(id='x', question='Which is a gas?', choices=dict(text=['ice', 'steam', 'iron'],
                                                           label=['1', '2', '3']), answerKey='2')
  a = benchmarks.load(f'arc:{write_jsonl(tmp_path / "ARC-Easy-Test.jsonl", [ai2])}')
  b = benchmarks.load(f'arc:{write_jsonl(tmp_path / "hf.jsonl", [hf])}')
  assert a.records == b.records == [dict(context='Question: Which is a gas?\nAnswer:',
                                         choices=['ice', 'steam', 'iron'], answer=1)]
  metrics = harness.evaluate(a, FakeScorer({('gas?\nAnswer:', ' steam'): -1.0}))
  assert metrics['acc'] == metrics['acc_norm'] == 1.0


def test_gsm8k_eight_shot_chain_of_thought_and_its_answers(tmp_path):
  records = [dict(question='Tom has 3 apples and buys 4. How many?',
                  answer='He has 3 + 4 = <<3+4=7>>7.\n#### 7'),
             dict(question='A shirt costs $1,200. Two cost?', answer='#### 2,400')]
  task = benchmarks.load(f'gsm8k:{write_jsonl(tmp_path / "test.jsonl", records)}')
  prompt = task.records[0]['prompt']
  assert prompt.startswith('Q: There are 15 trees in the grove.')
  assert prompt.count('\nA: ') == 8 and prompt.count('The answer is') == 8
  assert prompt.endswith('\n\nQ: Tom has 3 apples and buys 4. How many?\nA:')
  assert [r['answer'] for r in task.records] == ['7', '2,400']
  scorer = FakeScorer(completions=[
      ' 3 + 4 = 7. The answer is 7.\n\nQ: next question',  # Cut at "Q:".
      ' Each is $1,200, so 2 x 1,200 = $2,400.',  # No "The answer is": flexible only.
  ])
  metrics = harness.evaluate(task, scorer)
  assert metrics['exact_match_strict'] == 0.5 and metrics['exact_match_flexible'] == 1.0
  # As the math reward compares them: each solution's last number, 2,400 as 2400.
  assert metrics['exact_match_math_verify'] == 1.0
  assert scorer.calls[0][2] == benchmarks.GSM8K_STOPS and scorer.calls[0][1] == 0.0
  # Self-consistency: the majority of three sampled answers.
  scorer = FakeScorer(completions=['The answer is 7.', 'The answer is 2,400.',
                                   'The answer is 8.', 'The answer is 2400.',
                                   'The answer is 7.', 'The answer is 9.'])
  metrics = harness.evaluate(task, scorer, self_consistency=3)
  assert metrics['exact_match_strict'] == 1.0 and all(t > 0 for _, t, _ in scorer.calls)
  assert metrics['exact_match_math_verify'] == 1.0  # '2,400' and '2400' vote as one.


@pytest.mark.parametrize('completion, strict, flexible', [
    ('She pays 3 x $4 = $12, then 12 + 8 = 20. The answer is 20.', '20', '20'),
    ('Total: 1,234 apples. The answer is 1,234.', '1234', '1234'),
    # gsm8k_cot's strict filter reads only "The answer is N."; the last number is flexible's.
    ('So 5 - 7 = -2 degrees.\n#### -2', '[invalid]', '-2'),
    ('It costs \\boxed{42} dollars', '[invalid]', '42'),
    ('The answer is 5', '[invalid]', '5'),  # Its regex needs a character after the number.
    ('He ran 3.5 km, then 2 km, 5.5 km in all.', '[invalid]', '5.5'),
    ('The answer is $18.', '[invalid]', '18'),  # Strict takes no '$', as gsm8k_cot.
    ('No numbers here.', '[invalid]', '[invalid]'),
])
def test_answer_extraction_and_normalisation(completion, strict, flexible):
  assert benchmarks.normalize_number(benchmarks.strict_answer(completion)) == strict.lower()
  assert benchmarks.normalize_number(benchmarks.flexible_answer(completion)) == flexible.lower()


@pytest.mark.parametrize('kind, line, named', [
    ('gsm8k', {'question': 'q?', 'answer': 'no final number'}, '"answer" must end "#### N"'),
    ('gsm8k', {'answer': '#### 3'}, '"question" must be a string (missing)'),
    ('gsm8k', {'question': 'q?', 'answer': 'x ####'}, '"answer" must end "#### N"'),
    ('arc', {'question': 'q', 'choices': {'text': ['a', 'b'], 'label': ['A', 'B']},
             'answerKey': 'C'}, '"answerKey" \'C\' is not one of the labels'),
    ('arc', {'question': 'q', 'choices': {'text': [1, 2], 'label': ['A', 'B']},
             'answerKey': 'A'}, 'the choices must be at least 2 non-empty strings'),
    ('arc', {'question': 'q', 'choices': {'text': ['a'], 'label': ['A']}, 'answerKey': 'A'},
     'the choices must be at least 2 non-empty strings'),
    ('arc', {'question': 'q', 'choices': {'text': ['a', ''], 'label': ['A', 'B']},
             'answerKey': 'A'}, 'the choices must be at least 2 non-empty strings'),
    ('hellaswag', dict(HELLASWAG, label=7), '"label" must be an index 0-3'),
    ('hellaswag', dict(HELLASWAG, endings='one'), '"endings" must be a list of 4 strings'),
])
def test_a_wrong_record_is_named_by_file_line_and_field(tmp_path, kind, line, named):
  path = write_jsonl(tmp_path / 'data.jsonl', [line])
  with pytest.raises(ConfigError, match=rf'data.jsonl:1: {__import__("re").escape(named)}'):
    benchmarks.load(f'{kind}:{path}')


def test_a_wrong_mmlu_file_is_named(tmp_path):
  write_csv(tmp_path / 'dev' / 'law_dev.csv', mmlu_rows('law', 5))
  write_csv(tmp_path / 'test' / 'law_test.csv', [['q?', 'a', 'b', 'c', 'd', 'E']])
  with pytest.raises(ConfigError, match=r'law_test.csv:1: an MMLU row is question, A, B, C, D'):
    benchmarks.load(f'mmlu:{tmp_path}')
  write_csv(tmp_path / 'test' / 'law_test.csv', mmlu_rows('law', 1))
  write_csv(tmp_path / 'dev' / 'law_dev.csv', mmlu_rows('law', 3))
  with pytest.raises(ConfigError, match=r"law_test.csv:1: subject 'law' has 3 dev rows"):
    benchmarks.load(f'mmlu:{tmp_path}')
  with pytest.raises(ConfigError, match=r'--task=mmlu:.*missing: no such directory'):
    benchmarks.load(f'mmlu:{tmp_path / "missing"}')
  # A field past csv's limit (131,072 characters) is named, not a _csv.Error.
  write_csv(tmp_path / 'dev' / 'law_dev.csv', mmlu_rows('law', 5))
  write_csv(tmp_path / 'test' / 'law_test.csv', [['q' * 140_000, 'a', 'b', 'c', 'd', 'A']])
  with pytest.raises(ConfigError, match=r'law_test.csv:1: not a CSV row \(field larger than'):
    benchmarks.load(f'mmlu:{tmp_path}')


def test_mmlu_parquet_as_hugging_face_publishes_it(tmp_path):
  pyarrow_parquet = pytest.importorskip('pyarrow.parquet')
  import pyarrow  # pylint: disable=import-outside-toplevel
  csv_dir = tmp_path / 'csv'
  write_csv(csv_dir / 'dev' / 'virology_dev.csv', mmlu_rows('virology', 5))
  write_csv(csv_dir / 'test' / 'virology_test.csv', mmlu_rows('virology', 2, offset=5))
  (tmp_path / 'hf' / 'all').mkdir(parents=True)
  for split, rows in (('dev', mmlu_rows('virology', 5)), ('test', mmlu_rows('virology', 2, 5))):
    table = pyarrow.Table.from_pylist([
        dict(question=r[0], subject='virology', choices=r[1:5], answer='ABCD'.index(r[5]))
        for r in rows])
    pyarrow_parquet.write_table(table, tmp_path / 'hf' / 'all' / f'{split}-00000-of-00001.parquet')
  assert (benchmarks.load(f'mmlu:{tmp_path / "hf"}').records
          == benchmarks.load(f'mmlu:{csv_dir}').records)


def test_chat_prompting_sends_each_prompt_as_one_user_message():
  from lm import chat, tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  tokenizer = tokenizer_lib.ByteTokenizer()
  records = [dict(context='Question: Which is a gas?\nAnswer:', choices=['ice', 'steam'],
                  answer=1)]
  task = harness.as_chat(benchmarks.Task('arc', 'multiple_choice', records, delimiter=' '),
                         tokenizer)
  want = chat.render_text(tokenizer, [{'role': 'user', 'content': records[0]['context']}],
                          add_generation_prompt=True)
  bos = tokenizer.special_tokens.get('bos_token') or ''
  assert task.records[0]['context'] == (want[len(bos):] if want.startswith(bos) else want)
  assert 'Which is a gas?' in task.records[0]['context'] and task.delimiter == ' '
  assert task.records[0]['choices'] == ['ice', 'steam']


def test_an_mmlu_csv_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
  write_csv(tmp_path / 'dev' / 'law_dev.csv', mmlu_rows('law', 5))
  (tmp_path / 'test').mkdir()
  (tmp_path / 'test' / 'law_test.csv').write_bytes(b'"q?",a,b,c,d,A\n"\xff\xfe",a,b,c,d,B\n')
  with pytest.raises(ConfigError, match=r'law_test.csv:2 is not UTF-8'):
    benchmarks.load(f'mmlu:{tmp_path}')
