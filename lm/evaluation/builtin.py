"""Built-in tasks the project generates itself, so evaluation runs offline.

Answers are computed, so they are checkable: `arithmetic` (generation, exact match),
`arithmetic_choice` (multiple choice among near misses), `arithmetic_problems` (the
held-out word problems of config.data.source='arithmetic', a worked solution scored by its
final answer) and `stdlib_perplexity` (the held-out modules of the default pretraining
corpus); for a reward model, `arithmetic_pairs` (those problems' right and wrong solutions).
"""

import random

from lm.data import arithmetic as arithmetic_data, sources
from lm.evaluation.tasks import Task


def arithmetic(num_examples: int = 200, seed: int = 0) -> Task:
  rng = random.Random(seed)
  records = []
  for _ in range(num_examples):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    operator = rng.choice('+-')
    records.append({'prompt': f'Q: What is {a} {operator} {b}?\nA:',
                    'answer': f' {a + b if operator == "+" else a - b}'})
  return Task('arithmetic', 'generation', records)


def arithmetic_choice(num_examples: int = 200, seed: int = 1) -> Task:
  rng = random.Random(seed)
  records = []
  for _ in range(num_examples):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    right = a + b
    wrong = rng.sample([right + d for d in (-10, -2, -1, 1, 2, 10)], 3)
    choices = [f' {c}' for c in [right] + wrong]
    rng.shuffle(choices)
    records.append({'context': f'{a} + {b} =', 'choices': choices,
                    'answer': choices.index(f' {right}')})
  return Task('arithmetic_choice', 'multiple_choice', records)


def stdlib_perplexity(validation_fraction: float = 0.05) -> Task:
  """The validation split of `experiments/configs/default.py` (same hash, same fraction)."""
  _, validation = sources.split(sources.stdlib_source(), validation_fraction)
  return Task('stdlib_perplexity', 'perplexity',
              [{'text': validation[i]} for i in range(len(validation))])


def arithmetic_problems(validation_fraction: float = 0.05) -> Task:
  """The word problems that runs on config.data.source='arithmetic' hold out (at the
  default validation_fraction), each completion until the next 'Question:' scored by its
  final answer as the math reward scores it (lm/math_answers.py)."""
  _, held_out = sources.split(arithmetic_data.Problems(), validation_fraction)
  records = [{'prompt': example['prompt'], 'answer': example['answer']}
             for example in (held_out[i][0] for i in range(len(held_out)))]
  return Task('arithmetic_problems', 'generation', records, stops=('\nQuestion:',),
              extract='final_answer')


def arithmetic_pairs(validation_fraction: float = 0.05) -> Task:
  """The held-out word problems of config.data.source='arithmetic' as a reward model's
  pairs: the worked solution over one that slips (arithmetic.wrong_response)."""
  _, held_out = sources.split(arithmetic_data.Problems(pairs=True), validation_fraction)
  records = [{field: example[field] for field in ('prompt', 'chosen', 'rejected')}
             for example in (held_out[i][0] for i in range(len(held_out)))]
  return Task('arithmetic_pairs', 'pairs', records)


# A reward model's (model.head 'score'): pairs to rank.
REWARD_MODEL_TASKS = {'arithmetic_pairs': arithmetic_pairs}

BUILTIN_TASKS = {
    'arithmetic': arithmetic,
    'arithmetic_choice': arithmetic_choice,
    'arithmetic_problems': arithmetic_problems,
    'stdlib_perplexity': stdlib_perplexity,
}
