"""Rewards for GRPO, by name (config.train.grpo.reward).

A rule reward is `(example, completion, finished) -> float`: the example (a dict of texts:
'prompt', and whatever else its JSON line holds), the sampled completion's text (without
its eos) and whether it ended with eos within the token budget. 'model:<workdir>' is a
trained reward model (objective 'reward_model'): its score of prompt + completion, on
device (lm/objectives/reward_model.Scorer). Parts joined by '+' sum their rewards
('math+math_format', 'model:/tmp/lm_reward+math_format').
"""

import ast
import re

from lm import math_answers
from lm.data import sources
from lm.errors import ConfigError

# Parameters a method need not read.
_IMPLICIT_PARAMETERS = ('self', 'cls')


def parse_function(prompt: str, completion: str):
  """The ast.FunctionDef (or AsyncFunctionDef) that prompt + completion is, or None if
  they do not parse as exactly one function."""
  try:
    with sources.AST_LOCK:  # grain's threads may be parsing the stdlib meanwhile.
      module = ast.parse(prompt + completion)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None
  if len(module.body) != 1 or not isinstance(module.body[0],
                                             (ast.FunctionDef, ast.AsyncFunctionDef)):
    return None
  return module.body[0]


def python_function(example: dict[str, str], completion: str, finished: bool) -> float:
  """For prompts that open a Python function (its `def` line and docstring, as the
  'stdlib_functions' source gives): 0 unless the completion ended and prompt + completion
  parse as that one function with a statement after its docstring; then 1 if the body
  reads every parameter (self and cls aside), else 0.5. A checkable proxy for a body that
  implements the docstring; the KL penalty keeps the policy near the SFT model, which
  writes bodies like the library's."""
  function = parse_function(example['prompt'], completion) if finished else None
  if function is None or len(function.body) < 2:  # Not a function, or the docstring alone.
    return 0.0
  arguments = function.args
  parameters = {argument.arg for argument in (
      *arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg,
      arguments.kwarg) if argument is not None} - set(_IMPLICIT_PARAMETERS)
  read = {node.id for statement in function.body[1:] for node in ast.walk(statement)
          if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
  return 1.0 if parameters <= read else 0.5


def exact_match(example: dict[str, str], completion: str, finished: bool) -> float:
  """1 if the completion ended and, stripped of outer whitespace, equals the example's
  'answer' field (so a jsonl line reads {"prompt": ..., "answer": ...}), else 0."""
  if 'answer' not in example:
    raise ConfigError(f"config.train.grpo.reward='exact_match' needs an 'answer' field in"
                      f' each example; this one has {sorted(example)}')
  return float(finished and completion.strip() == example['answer'].strip())


def math(example: dict[str, str], completion: str, finished: bool) -> float:
  """1 if the completion ended and its final answer (`final_answer`) equals the example's
  'answer' (a number or expression; a GSM8K answer's text after '####'), else 0
  (lm/math_answers.py)."""
  if 'answer' not in example:
    raise ConfigError(f"config.train.grpo.reward='math' needs an 'answer' field in each"
                      f' example; this one has {sorted(example)}')
  return float(finished and math_answers.same(
      completion, math_answers.final_answer(example['answer'])))


_MARKED = re.compile(r'####\s*\S|\\boxed\{')


def math_format(example: dict[str, str], completion: str, finished: bool) -> float:
  """0.1 if the completion ended and marks its answer, after '####' or in \\boxed{}: a
  small reward for the form, beside 'math' for the answer ('math+math_format')."""
  del example
  return 0.1 if finished and _MARKED.search(completion) else 0.0


REWARDS = {'python_function': python_function, 'exact_match': exact_match, 'math': math,
           'math_format': math_format}
# The fields of an example a rule reads beyond its prompt.
FIELDS = {'exact_match': ('answer',), 'math': ('answer',)}


def fields(spec: str) -> tuple[str, ...]:
  """The example fields the rules of '+'-joined `spec` read, checked at a run's start."""
  return tuple(dict.fromkeys(field for name in spec.split('+')
                             for field in FIELDS.get(name, ())))


MODEL = 'model:'  # A part naming a reward model's workdir.


def model_workdirs(spec: str) -> list[str]:
  """The reward models' workdirs that '+'-joined `spec` names."""
  return [part[len(MODEL):] for part in spec.split('+') if part.startswith(MODEL)]


def unknown(spec: str) -> list[str]:
  """The parts of '+'-joined `spec` that are neither rules nor a reward model's workdir."""
  return [name for name in spec.split('+') if name not in REWARDS
          and not (name.startswith(MODEL) and name[len(MODEL):])]


def get(spec: str):
  """The sum of the rule rewards '+'-joined `spec` names (0 if it names only models)."""
  parts = [REWARDS[name] for name in spec.split('+') if not name.startswith(MODEL)]
  if len(parts) == 1:
    return parts[0]
  return lambda example, completion, finished: sum(
      part(example, completion, finished) for part in parts)
