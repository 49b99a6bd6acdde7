"""A built-in task with checkable answers (config.data.source='arithmetic'): arithmetic word
problems at graded difficulty, each with a worked solution and its final number, generated
offline from a fixed seed, so that every run and every stage sees the same problems.

A problem's difficulty is its number of steps (1 to 3): someone has a number of things,
then gets more, loses some, multiplies them or shares them out. Its solution is one line
per step, `a + b = c.`, then `#### c` as GSM8K ends its answers; its `answer` is c. The
held-out split is config.data.validation_fraction of the problems, by the hash of their
text (sources.split): a problem's text never falls on both sides.
"""

import random
import re

NUM_PROBLEMS = 20_000
SEED = 0  # The task's own: not config.seed, so every run's split is the same.
MAX_STEPS = 3

_NAMES = ('Ana', 'Ben', 'Chloe', 'Dev', 'Eli', 'Farah', 'Gus', 'Hana', 'Ivan', 'Jun', 'Kofi',
          'Lena', 'Mateo', 'Nia', 'Omar', 'Priya')
_THINGS = ('apples', 'marbles', 'stickers', 'books', 'coins', 'shells', 'pencils', 'stamps',
           'cards', 'beads')


def _step(rng: random.Random, name: str, things: str, have: int, last: bool):
  """(sentence, solution line, new count) of one step on `have` things."""
  kinds = ['more', 'fewer', 'times'] + (['shared'] if last else [])
  kind = rng.choice(kinds if have > 1 else ['more', 'times'])
  if kind == 'more':
    more = rng.randint(2, 30)
    verb = rng.choice(('finds', 'buys', 'is given'))
    return f'{name} {verb} {more} more.', f'{have} + {more} = {have + more}.', have + more
  if kind == 'fewer':
    fewer = rng.randint(1, have - 1)
    verb = rng.choice(('gives away', 'loses', 'sells'))
    return f'{name} {verb} {fewer}.', f'{have} - {fewer} = {have - fewer}.', have - fewer
  if kind == 'times':
    times = rng.randint(2, 4)
    return (f"Then {name}'s {things} become {times} times as many.",
            f'{have} * {times} = {have * times}.', have * times)
  # Shared equally, as the last step: the count divides exactly, by choice of the divisor.
  divisors = [d for d in range(2, 10) if have % d == 0]
  if not divisors:
    return _step(rng, name, things, have, last=False)
  ways = rng.choice(divisors)
  return (f'{name} shares them equally among {ways} friends.',
          f'{have} / {ways} = {have // ways}.', have // ways)


def problem(rng: random.Random, steps: int) -> dict[str, str]:
  """One problem of `steps` steps: {'prompt', 'response', 'answer'}."""
  name, things = rng.choice(_NAMES), rng.choice(_THINGS)
  have = rng.randint(2, 40)
  sentences, lines = [f'{name} has {have} {things}.'], []
  for index in range(steps):
    sentence, line, have = _step(rng, name, things, have, last=index == steps - 1)
    sentences.append(sentence)
    lines.append(line)
  shared = sentences[-1].startswith(f'{name} shares')
  question = (f'How many {things} does each friend get?' if shared
              else f'How many {things} does {name} have now?')
  return {'prompt': f'Question: {" ".join(sentences)} {question}\nAnswer:',
          'response': ' ' + ' '.join(lines) + f'\n#### {have}\n', 'answer': str(have)}


_LINE = re.compile(r'(\d+) ([-+*/]) (\d+) = (\d+)\.')
_APPLY = {'+': lambda a, b: a + b, '-': lambda a, b: a - b, '*': lambda a, b: a * b,
          '/': lambda a, b: a // b}


def wrong_response(response: str, rng: random.Random) -> str:
  """`response`'s steps with one result off by 1 to 5, carried through the steps after
  it, ending in a final number that is not the answer: a worked solution as a model gets
  one wrong, the rejected side of a preference pair."""
  found = _LINE.findall(response)
  steps = [(int(a), op, int(b)) for a, op, b, _ in found]
  wrong_step, slip = rng.randrange(len(steps)), rng.choice((-1, 1)) * rng.randint(1, 5)
  for slip in (slip, abs(slip)):  # Down, unless a count would fall below zero.
    lines, have = [], None
    for index, (a, op, b) in enumerate(steps):
      a = a if have is None else have
      have = _APPLY[op](a, b) + (slip if index == wrong_step else 0)
      if index == len(steps) - 1 and str(have) == found[-1][3]:
        have += 1  # Integer division can undo the slip: the final number must be wrong.
      lines.append(f'{a} {op} {b} = {have}.')
      if have < 0:
        break
    else:
      break
  return ' ' + ' '.join(lines) + f'\n#### {have}\n'


class Problems:
  """The task as a source: item i is [problem i] (a post-training item is a list of
  examples), problem i of difficulty 1 + i % MAX_STEPS; keys are the prompts. With
  `pairs`, each also has 'chosen' (its solution) and 'rejected' (`wrong_response`)."""

  def __init__(self, num_problems: int = NUM_PROBLEMS, pairs: bool = False):
    rng = random.Random(SEED)
    self.problems = [problem(rng, 1 + i % MAX_STEPS) for i in range(num_problems)]
    self.keys = [p['prompt'] for p in self.problems]
    self.skipped, self.files = [], {}  # Nothing read from disk.
    self.pairs = pairs

  def __len__(self):
    return len(self.problems)

  def __getitem__(self, index: int) -> list[dict[str, str]]:
    example = dict(self.problems[index])
    if self.pairs:  # Each problem's own generator: the same pair whatever is read before.
      example.update(chosen=example['response'], rejected=wrong_response(
          example['response'], random.Random(f'{SEED}:wrong:{index}')))
    return [example]


class Texts:
  """The task's problems and solutions as pretraining documents (prompt + response)."""

  def __init__(self, problems: Problems | None = None):
    self.problems = problems or Problems()
    self.keys, self.skipped, self.files = self.problems.keys, [], {}

  def __len__(self):
    return len(self.problems)

  def __getitem__(self, index: int) -> str:
    [example] = self.problems[index]
    return example['prompt'] + example['response']
