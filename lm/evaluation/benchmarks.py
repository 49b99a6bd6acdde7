"""The field's benchmarks, read from their published files, in lm-evaluation-harness's
prompt formats and metrics, so a number here means what one there does.

  --task=mmlu:DIR        MMLU: DIR/dev/*_dev.csv and DIR/test/*_test.csv as the original
                         archive has them (question, A, B, C, D, answer letter; no header),
                         or the Hugging Face rows ({question, subject, choices, answer}) as
                         DIR/**/{dev,test}-*.parquet (with pyarrow) or DIR/{dev,test}.jsonl.
                         5-shot from the subject's dev rows; acc over " A".." D", and per
                         subject.
  --task=hellaswag:FILE  HellaSwag JSON lines (ctx_a, ctx_b, activity_label, endings,
                         label); 0-shot; acc and acc_norm.
  --task=arc:FILE        ARC-Easy or -Challenge JSON lines (AI2's {question: {stem, choices}}
                         or Hugging Face's {question, choices: {text, label}}, answerKey);
                         "Question: ...\\nAnswer:", 0-shot; acc and acc_norm.
  --task=gsm8k:FILE      GSM8K JSON lines ({question, answer ending "#### N"}); 8-shot
                         chain of thought with the exemplars of Wei et al. (2022), as
                         gsm8k_cot; generation until "Q:", "</s>" or "<|im_end|>" (and the
                         end of text); exact match of "The answer is N." (strict) and of
                         the last number (flexible).

acc_norm divides a choice's log-likelihood by its length in characters, as lm-evaluation-
harness does. Prompts, stop strings and answer extraction are those of the harness's task
configs (lm_eval/tasks/{mmlu/default,hellaswag,arc,gsm8k/gsm8k-cot.yaml}), which
experiments/eval_parity.py checks. A wrong or partial file is named with file:line and
the field.
"""

import csv
import glob
import json
import os
import re

from lm.errors import ConfigError
from lm.evaluation import inputs
from lm.evaluation.tasks import Task

LETTERS = 'ABCD'


def load(spec: str) -> Task:
  """'kind:path' -> the task."""
  kind, _, path = spec.partition(':')
  return READERS[kind](path)


def is_benchmark(spec: str) -> bool:
  return spec.partition(':')[0] in READERS and ':' in spec


def _json_lines(path: str, spec: str):
  if not os.path.isfile(path):
    raise ConfigError(f'--task={spec}: no such file {path!r}')
  return inputs.json_records(path, '--task')


def _field(record: dict, name: str, where: str, kind=str, what: str = 'a string'):
  value = record.get(name)
  if not isinstance(value, kind) or isinstance(value, bool):
    shown = 'missing' if name not in record else f'got {repr(value)[:40]}'
    raise ConfigError(f'{where}: "{name}" must be {what} ({shown})')
  return value


def _nonempty(records: list, spec: str) -> list:
  if not records:
    raise ConfigError(f'--task={spec} holds no records')
  return records


# MMLU ---------------------------------------------------------------------------------


def _mmlu_question(question: str, choices: list[str]) -> str:
  return (question.strip() + ''.join(f'\n{letter}. {choice}'
                                     for letter, choice in zip(LETTERS, choices)) + '\nAnswer:')


def _mmlu_rows(directory: str, split: str, spec: str) -> list[dict]:
  """{subject, question, choices, answer} rows of one split, CSV or JSON lines."""
  rows = []
  csv_files = sorted(glob.glob(os.path.join(directory, split, f'*_{split}.csv')))
  jsonl = os.path.join(directory, f'{split}.jsonl')
  parquet = sorted(glob.glob(os.path.join(directory, '**', f'{split}-*.parquet'),
                             recursive=True))
  if parquet:
    for path in parquet:
      for number, record in enumerate(_parquet_rows(path, spec), start=1):
        rows.append(_mmlu_record(record, f'{path} row {number}'))
  elif csv_files:
    for path in csv_files:
      subject = os.path.basename(path)[:-len(f'_{split}.csv')]
      # read_lines names a file that is not UTF-8 by file:line.
      reader = csv.reader(inputs.read_lines(path, '--task'))
      for cells in _csv_rows(reader, path):
        where = f'{path}:{reader.line_num}'
        if len(cells) != 6 or cells[5].strip() not in LETTERS:
          raise ConfigError(f'{where}: an MMLU row is question, A, B, C, D, answer letter'
                            f' (got {len(cells)} fields)')
        rows.append(dict(subject=subject, question=cells[0], choices=cells[1:5],
                         answer=LETTERS.index(cells[5].strip()), where=where))
  elif os.path.isfile(jsonl):
    rows = [_mmlu_record(record, where) for where, record in _json_lines(jsonl, spec)]
  else:
    raise ConfigError(f'--task={spec}: {directory} has no {split}/*_{split}.csv,'
                      f' {split}.jsonl or {split}-*.parquet')
  return rows


def _csv_rows(reader, path: str):
  """The reader's rows; a row it cannot parse (a field past csv's limit of 131,072
  characters, say) is named by file:line."""
  while True:
    try:
      yield next(reader)
    except StopIteration:
      return
    except csv.Error as error:
      raise ConfigError(f'{path}:{reader.line_num}: not a CSV row ({error})') from error


def _mmlu_record(record: dict, where: str) -> dict:
  """A Hugging Face row {question, subject, choices, answer}, checked."""
  choices = record.get('choices')
  if not isinstance(choices, list) or len(choices) != 4 or not all(
      isinstance(c, str) for c in choices):
    raise ConfigError(f'{where}: "choices" must be a list of 4 strings')
  answer = _field(record, 'answer', where, int, 'an index 0-3')
  if not 0 <= answer < 4:
    raise ConfigError(f'{where}: "answer" must be an index 0-3 (got {answer})')
  return dict(subject=_field(record, 'subject', where), choices=choices,
              question=_field(record, 'question', where), answer=answer, where=where)


def _parquet_rows(path: str, spec: str) -> list[dict]:
  try:
    import pyarrow.parquet  # pylint: disable=import-outside-toplevel (optional)
  except ImportError as error:
    raise ConfigError(f'--task={spec}: reading {path} needs pyarrow (pip install pyarrow),'
                      ' or give the CSV or JSON-lines files') from error
  try:
    return pyarrow.parquet.read_table(path).to_pylist()
  except Exception as error:  # pylint: disable=broad-except (pyarrow's many kinds)
    raise ConfigError(f'{path} is not a readable parquet file ({error})') from error


def mmlu(directory: str) -> Task:
  spec = f'mmlu:{directory}'
  if not os.path.isdir(directory):
    raise ConfigError(f'--task={spec}: no such directory')
  dev = {}
  for row in _mmlu_rows(directory, 'dev', spec):
    dev.setdefault(row['subject'], []).append(row)
  records = []
  for row in _mmlu_rows(directory, 'test', spec):
    shots = dev.get(row['subject'], [])
    if len(shots) < 5:
      raise ConfigError(f'{row["where"]}: subject {row["subject"]!r} has {len(shots)} dev'
                        ' rows; its 5-shot prompt needs 5')
    description = ('The following are multiple choice questions (with answers) about'
                   f' {row["subject"].replace("_", " ")}.\n\n')
    examples = ''.join(_mmlu_question(s['question'], s['choices']) + ' '
                       + LETTERS[s['answer']] + '\n\n' for s in shots[:5])
    records.append(dict(context=description + examples
                        + _mmlu_question(row['question'], row['choices']),
                        choices=list(LETTERS), answer=row['answer'], subject=row['subject']))
  return Task('mmlu', 'multiple_choice', _nonempty(records, spec), delimiter=' ',
              fixed_shots=5)


# HellaSwag ----------------------------------------------------------------------------


def _hellaswag_text(text: str) -> str:
  """lm-evaluation-harness's clean-up of HellaSwag (WikiHow's bracketed artifacts)."""
  text = text.strip().replace(' [title]', '. ')
  text = re.sub(r'\[.*?\]', '', text)
  return text.replace('  ', ' ')


def hellaswag(path: str) -> Task:
  spec, records = f'hellaswag:{path}', []
  for where, record in _json_lines(path, f'hellaswag:{path}'):
    endings = _field(record, 'endings', where, list, 'a list of 4 strings')
    if len(endings) != 4 or not all(isinstance(e, str) for e in endings):
      raise ConfigError(f'{where}: "endings" must be a list of 4 strings')
    label = record.get('label')
    if isinstance(label, str) and label.isdigit():
      label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 4:
      raise ConfigError(f'{where}: "label" must be an index 0-3 (got {label!r})')
    context = (_field(record, 'ctx_a', where) + ' '
               + _field(record, 'ctx_b', where).capitalize())
    records.append(dict(
        context=_hellaswag_text(_field(record, 'activity_label', where) + ': ' + context),
        choices=[_hellaswag_text(e) for e in endings], answer=label))
  return Task('hellaswag', 'multiple_choice', _nonempty(records, spec), delimiter=' ')


# ARC ----------------------------------------------------------------------------------


def arc(path: str) -> Task:
  spec, records = f'arc:{path}', []
  for where, record in _json_lines(path, spec):
    question = record.get('question')
    if isinstance(question, dict):  # AI2's own files.
      stem = _field(question, 'stem', where + ' question')
      options = question.get('choices')
      ok = isinstance(options, list) and all(
          isinstance(o, dict) and isinstance(o.get('text'), str)
          and isinstance(o.get('label'), str) for o in options)
      if not ok:
        raise ConfigError(f'{where}: "question.choices" must be a list of {{text, label}}')
      texts, labels = [o['text'] for o in options], [o['label'] for o in options]
    else:  # Hugging Face's rows.
      stem = _field(record, 'question', where)
      options = record.get('choices')
      ok = (isinstance(options, dict) and isinstance(options.get('text'), list)
            and isinstance(options.get('label'), list)
            and len(options['text']) == len(options['label']))
      if not ok:
        raise ConfigError(f'{where}: "choices" must be {{text: [...], label: [...]}}')
      texts, labels = options['text'], options['label']
    if not (len(texts) >= 2 and all(isinstance(t, str) and t.strip() for t in texts)
            and all(isinstance(label, str) for label in labels)):
      raise ConfigError(f'{where}: the choices must be at least 2 non-empty strings with'
                        f' string labels (got {json.dumps(texts)[:60]})')
    key = _field(record, 'answerKey', where)
    if key not in labels:
      raise ConfigError(f'{where}: "answerKey" {key!r} is not one of the labels {labels}')
    records.append(dict(context=f'Question: {stem}\nAnswer:', choices=list(texts),
                        answer=labels.index(key)))
  name = os.path.splitext(os.path.basename(path))[0]
  return Task(f'arc:{name}', 'multiple_choice', _nonempty(records, spec), delimiter=' ')


# GSM8K --------------------------------------------------------------------------------

# Chain-of-thought exemplars of Wei et al. (2022), as lm-evaluation-harness's gsm8k_cot.
GSM8K_EXEMPLARS = (
    ('There are 15 trees in the grove. Grove workers will plant trees in the grove today.'
     ' After they are done, there will be 21 trees. How many trees did the grove workers'
     ' plant today?',
     'There are 15 trees originally. Then there were 21 trees after some more were planted.'
     ' So there must have been 21 - 15 = 6. The answer is 6.'),
    ('If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in'
     ' the parking lot?',
     'There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.'),
    ('Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they'
     ' have left in total?',
     'Originally, Leah had 32 chocolates. Her sister had 42. So in total they had'
     ' 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39.'),
    ('Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops.'
     ' How many lollipops did Jason give to Denny?',
     'Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he'
     ' gave Denny 20 - 12 = 8. The answer is 8.'),
    ('Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How'
     ' many toys does he have now?',
     'Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is'
     ' 4 more toys. 5 + 4 = 9. The answer is 9.'),
    ('There were nine computers in the server room. Five more computers were installed'
     ' each day, from monday to thursday. How many computers are now in the server room?',
     'There were originally 9 computers. For each of 4 days, 5 more computers were added.'
     ' So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.'),
    ('Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost'
     ' 2 more. How many golf balls did he have at the end of wednesday?',
     'Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35.'
     ' After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.'),
    ('Olivia has $23. She bought five bagels for $3 each. How much money does she have'
     ' left?',
     'Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So'
     ' she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.'),
)
# gsm8k_cot's generation_kwargs.until (version 3): no blank line, so an answer may run on.
GSM8K_STOPS = ('Q:', '</s>', '<|im_end|>')


def gsm8k_prompt(question: str) -> str:
  shots = ''.join(f'Q: {q}\nA: {a}\n\n' for q, a in GSM8K_EXEMPLARS)
  return f'{shots}Q: {question}\nA:'


def gsm8k(path: str) -> Task:
  spec, records = f'gsm8k:{path}', []
  for where, record in _json_lines(path, spec):
    answer = _field(record, 'answer', where, what='a string ending "#### N"')
    if '####' not in answer or not answer.split('####')[-1].strip():
      raise ConfigError(f'{where}: "answer" must end "#### N" (the final number)')
    records.append(dict(prompt=gsm8k_prompt(_field(record, 'question', where)),
                        answer=answer.split('####')[-1].strip()))
  return Task('gsm8k', 'generation', _nonempty(records, spec), stops=GSM8K_STOPS,
              extract='chain_of_thought', fixed_shots=8)


READERS = {'mmlu': mmlu, 'hellaswag': hellaswag, 'arc': arc, 'gsm8k': gsm8k}


# Answers ------------------------------------------------------------------------------

# gsm8k_cot's filters: strict-match (the first match; its final "." is any character but
# a newline, so "The answer is 5" ending a line or the text is no answer) and
# flexible-extract (the last match).
_STRICT = re.compile(r'The answer is (\-?[0-9\.\,]+).')
_FLEXIBLE = re.compile(r'(-?[$0-9.,]{2,})|(-?[0-9]+)')
# gsm8k_cot's exact_match: these removed in turn, then the case folded.
_IGNORED = (',', r'\$', '(?s).*#### ', r'\.$')


def strict_answer(completion: str) -> str:
  """The N of the first 'The answer is N' followed by a character on its line, else
  '[invalid]'."""
  match = _STRICT.search(completion)
  return match.group(1).strip() if match else '[invalid]'


def flexible_answer(completion: str) -> str:
  """The last number-like span, as lm-evaluation-harness's flexible-extract."""
  matches = _FLEXIBLE.findall(completion)
  if not matches:
    return '[invalid]'
  return next(group for group in matches[-1] if group).strip()


def normalize_number(answer: str) -> str:
  """As gsm8k_cot's exact_match compares an answer: no commas or '$', nothing up to
  '#### ', no final period, case folded."""
  for pattern in _IGNORED:
    answer = re.sub(pattern, '', answer)
  return answer.lower()
