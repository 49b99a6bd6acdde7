"""Tasks are data: a JSON-lines file whose fields say what kind of task it is.

  perplexity       {"text": ...}
  multiple_choice  {"context": ..., "choices": [...], "answer": <index of the right choice>}
  generation       {"prompt": ..., "answer": <a string or a number>}
  pairs            {"prompt": ..., "chosen": ..., "rejected": ...}  (for a reward model)

Fields of the wrong type are refused at load time, naming file:line and the field.

Few-shot prompts put `num_shots` other solved examples of the same task (seeded draw)
before each one, separated by blank lines. The built-in tasks (lm.evaluation.builtin)
are the same records, generated.
"""

import dataclasses
import os
import random

from lm.errors import ConfigError
from lm.evaluation import inputs

KINDS = {  # First match wins: a pair may carry an answer too.
    'pairs': ('prompt', 'chosen', 'rejected'),
    'perplexity': ('text',),
    'multiple_choice': ('context', 'choices', 'answer'),
    'generation': ('prompt', 'answer'),
}
SHOT_SEPARATOR = '\n\n'


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str
  records: list[dict]
  # Benchmarks (lm/evaluation/benchmarks.py) set these as lm-evaluation-harness does.
  delimiter: str = ''  # Between a multiple-choice context and each choice.
  fixed_shots: int = 0  # Shots already in each record's prompt (--num_shots then refused).
  stops: tuple[str, ...] = ()  # Generation ends at the first; () : at the first line.
  # Or 'chain_of_thought' (benchmarks.strict_answer, ...), or 'final_answer' (a worked
  # solution's, lm/math_answers.py).
  extract: str = 'first_line'


def kind_of(record: dict, where: str) -> str:
  for kind, fields in KINDS.items():
    if all(field in record for field in fields):
      return kind
  raise ConfigError(f'{where}: fields {sorted(record)} match no task kind; a task needs '
                    + '; or '.join(f'{k}: {", ".join(f)}' for k, f in KINDS.items()))


def checked(record: dict, kind: str, where: str) -> dict:
  """`record` if every field has its kind's type; a generation answer that is a number
  becomes its text, since answers are compared and shown as text."""
  def expect(ok: bool, field: str, what: str) -> None:
    if not ok:
      shown = repr(record[field])
      raise ConfigError(f'{where}: "{field}" must be {what}, got'
                        f' {shown if len(shown) <= 40 else shown[:37] + "..."}')

  def is_number(value, types=(int, float)) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)  # bool is an int.

  if kind == 'perplexity':
    expect(isinstance(record['text'], str), 'text', 'a string')
    return record
  if kind == 'multiple_choice':
    choices, answer = record['choices'], record['answer']
    expect(isinstance(record['context'], str), 'context', 'a string')
    # An empty choice has log-likelihood 0, so it would always win.
    expect(isinstance(choices, list) and len(choices) >= 2
           and all(isinstance(c, str) and c for c in choices),
           'choices', 'a list of at least 2 non-empty strings')
    expect(is_number(answer, int) and 0 <= answer < len(choices),
           'answer', 'an index into "choices"')
    return record
  if kind == 'pairs':
    for field in KINDS['pairs']:
      expect(isinstance(record[field], str), field, 'a string')
    return record
  expect(isinstance(record['prompt'], str), 'prompt', 'a string')
  expect(isinstance(record['answer'], str) or is_number(record['answer']),
         'answer', 'a string or a number')
  return {**record, 'answer': str(record['answer'])}


def load(path: str) -> Task:
  if not os.path.isfile(path):
    raise ConfigError(f'--task={path}: no such file (or built-in task)')
  records, kind = [], None
  for where, record in inputs.json_records(path, '--task'):
    record_kind = kind_of(record, where)
    if kind is not None and record_kind != kind:
      raise ConfigError(f'{where} is a {record_kind} record in a {kind} task')
    kind = record_kind
    records.append(checked(record, kind, where))
  if not records:
    raise ConfigError(f'--task={path} holds no records')
  return Task(os.path.splitext(os.path.basename(path))[0], kind, records)


def solved(record: dict, task: Task) -> str:
  """An example with its answer, as it appears among the shots."""
  if task.kind == 'multiple_choice':
    return record['context'] + task.delimiter + record['choices'][record['answer']]
  return record['prompt'] + record['answer']


def few_shot_prefix(task: Task, index: int, num_shots: int, seed: int) -> str:
  """`num_shots` solved examples other than `index`, drawn with a per-example seed."""
  if num_shots == 0:
    return ''
  if num_shots >= len(task.records):
    raise ConfigError(f'--num_shots={num_shots} needs more than {len(task.records)} records'
                      f' in task {task.name}')
  others = [i for i in range(len(task.records)) if i != index]
  shots = random.Random(seed * 1_000_003 + index).sample(others, num_shots)
  return ''.join(solved(task.records[i], task) + SHOT_SEPARATOR for i in shots)
