"""Final answers of worked math solutions, compared as HF's math-verify compares them: for
the math reward (lm/objectives/rewards.py) and for scoring generated solutions
(lm/evaluation/harness.py)."""

import logging
import threading


def final_answer(text: str) -> str:
  """What a worked solution answers: the text after its last '####' (GSM8K's mark), or,
  without one, the whole text (math-verify then takes a \\boxed{} answer, one after "the
  answer is", or the last number)."""
  return text.rsplit('####', 1)[1] if '####' in text else text


def same(text: str, gold: str) -> bool:
  """Whether `text`'s final answer equals the number or expression `gold`, as HF's
  math-verify compares them (LaTeX, fractions, sets, 1,234 and 1234 alike)."""
  import math_verify  # pylint: disable=import-outside-toplevel
  # Its timeouts are SIGALRM's, which only the main thread can set; elsewhere none.
  timeout = 5 if threading.current_thread() is threading.main_thread() else None
  logging.getLogger('math_verify').setLevel(logging.ERROR)  # It warns of no timeout.
  parse = lambda value: math_verify.parse(value, parsing_timeout=timeout)
  return bool(math_verify.verify(parse(gold), parse(final_answer(text)),
                                 timeout_seconds=timeout))
