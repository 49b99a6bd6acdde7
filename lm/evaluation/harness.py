"""Task -> metrics, given a Scorer (lm.evaluation.scoring) or anything with its methods.

- perplexity: token loss, perplexity and bits per byte over every document.
- multiple_choice: accuracy by the summed log-likelihood of each choice, and by that sum
  divided by the choice's length in bytes (length-normalised), so long choices are not
  penalised for their length. Benchmarks report lm-evaluation-harness's names and
  normalisation: acc, and acc_norm per character; MMLU also per subject.
- every kind counts the records whose context was cut from the left to fit the model's
  context window (`truncated`), as the harness cuts them.
- generation: exact match of the extracted answer; with `self_consistency` = k > 1,
  k sampled answers per example and the majority vote. Chain-of-thought tasks (GSM8K)
  score the strict extraction ("The answer is N") and the flexible one (the last number);
  worked solutions (`arithmetic_problems`) their final answer, as math-verify compares it.
"""

import collections
import dataclasses
import math
import re

from lm import chat, math_answers
from lm.evaluation import benchmarks
from lm.evaluation import tasks as tasks_lib

_NUMBER = re.compile(r'-?\d+(?:\.\d+)?')


def extract_answer(completion: str, reference: str) -> str:
  """The first line; if the reference is a number, the first number in that line."""
  line = completion.strip().split('\n', 1)[0].strip()
  if _NUMBER.fullmatch(reference.strip()):
    match = _NUMBER.search(line)
    return match.group(0) if match else line
  return line


def normalize(answer: str) -> str:
  return ' '.join(answer.lower().split())


def majority_vote(answers: list[str]) -> str:
  """The most frequent answer; ties go to the one seen first."""
  counts = collections.Counter(answers)
  return max(answers, key=lambda a: (counts[a], -answers.index(a)))


def _majority_by_value(answers: list[str]) -> str:
  """The answer that the most answers equal as math-verify compares them ('0.5' and
  '1/2' vote together); ties go to the one seen first."""
  if len(answers) == 1:
    return answers[0]
  votes = [sum(math_answers.same(other, answer) for other in answers) for answer in answers]
  return answers[votes.index(max(votes))]


def default_max_new_tokens(task: tasks_lib.Task) -> int:
  """New tokens a generation task's answers get by default: room for a chain of thought
  (GSM8K), for a worked solution and its final answer, or for a short answer."""
  return {'chain_of_thought': 256, 'final_answer': 64}.get(task.extract, 16)


def evaluate(task: tasks_lib.Task, scorer, *, num_shots: int = 0, seed: int = 0,
             limit: int | None = None, max_new_tokens: int = 16, self_consistency: int = 1,
             temperature: float = 0.7, samples: list | None = None) -> dict:
  """The task's metrics. `samples`, when given, receives one dict per record: its index,
  the log-likelihood of each choice, or the completion, or the document's log-likelihood,
  and whether its context was cut to fit the window."""
  indices = range(len(task.records))[:limit]
  records = [task.records[i] for i in indices]
  prefixes = [tasks_lib.few_shot_prefix(task, i, num_shots, seed) for i in indices]
  samples = [] if samples is None else samples
  benchmark = bool(task.delimiter or task.extract != 'first_line')

  if task.kind == 'perplexity':
    nats, tokens, num_bytes = 0.0, 0, 0
    for index, record in zip(indices, records):
      log_likelihood, count = scorer.document_log_likelihood(record['text'])
      nats, tokens = nats - log_likelihood, tokens + count
      num_bytes += len(record['text'].encode('utf-8'))
      samples.append({'index': index, 'log_likelihood': log_likelihood, 'tokens': count})
    return {'loss': nats / tokens, 'perplexity': math.exp(min(nats / tokens, 50.0)),
            'bits_per_byte': nats / math.log(2) / max(num_bytes, 1), 'tokens': tokens,
            'documents': len(records)}

  if task.kind == 'pairs':  # A reward model's ranking (scoring.RewardScorer).
    chosen = scorer.rewards([(r['prompt'], r['chosen']) for r in records])
    rejected = scorer.rewards([(r['prompt'], r['rejected']) for r in records])
    margins = [c - r for (c, _), (r, _) in zip(chosen, rejected)]
    for index, (c, cut_c), (r, cut_r) in zip(indices, chosen, rejected):
      samples.append({'index': index, 'chosen_reward': c, 'rejected_reward': r,
                      'truncated': cut_c or cut_r})
    return {'accuracy': sum(m > 0 for m in margins) / len(records),
            'margin': sum(margins) / len(records), 'pairs': len(records),
            'truncated': sum(sample['truncated'] for sample in samples[-len(records):])}

  if task.kind == 'multiple_choice':
    # A record's context (its shots included) runs once for all its choices.
    scored = scorer.choice_log_likelihoods(
        [(prefix + r['context'], [task.delimiter + c for c in r['choices']])
         for prefix, r in zip(prefixes, records)])
    right, right_norm, cut = [], [], []
    for index, record, choice_scores in zip(indices, records, scored):
      log_likelihoods = [score.log_likelihood for score in choice_scores]
      # Benchmarks normalise per character, as the harness's acc_norm; tasks per byte.
      lengths = [len(c) if benchmark else len(c.encode('utf-8')) for c in record['choices']]
      normalized = [ll / max(n, 1) for ll, n in zip(log_likelihoods, lengths)]
      right.append(log_likelihoods.index(max(log_likelihoods)) == record['answer'])
      right_norm.append(normalized.index(max(normalized)) == record['answer'])
      cut.append(any(score.truncated for score in choice_scores))
      samples.append({'index': index, 'log_likelihoods': log_likelihoods,
                      'greedy': [score.greedy for score in choice_scores],
                      'answer': record['answer'], 'truncated': cut[-1]})
    if benchmark:
      metrics = {'acc': sum(right) / len(records), 'acc_norm': sum(right_norm) / len(records)}
    else:
      metrics = {'accuracy': sum(right) / len(records),
                 'accuracy_normalized': sum(right_norm) / len(records)}
    metrics.update(examples=len(records), truncated=sum(cut))
    if 'subject' in records[0]:
      by_subject = collections.defaultdict(list)
      for record, ok in zip(records, right):
        by_subject[record['subject']].append(ok)
      metrics['acc_by_subject'] = {subject: sum(oks) / len(oks)
                                   for subject, oks in sorted(by_subject.items())}
    return metrics

  prompts = [prefix + r['prompt'] for prefix, r in zip(prefixes, records)]
  sampled = self_consistency > 1
  runs = [scorer.complete(prompts, max_new_tokens=max_new_tokens,
                          temperature=temperature if sampled else 0.0,
                          seed=seed + 1000 * k, **({'stops': task.stops} if benchmark else {}))
          for k in range(self_consistency)]
  for i, (index, record) in enumerate(zip(indices, records)):
    samples.append({'index': index, 'completion': [run[i].text for run in runs] if sampled
                    else runs[0][i].text, 'answer': record['answer'],
                    'truncated': runs[0][i].truncated})
  metrics = {'examples': len(records), 'self_consistency': self_consistency,
             'truncated': sum(completion.truncated for completion in runs[0])}
  if task.extract == 'final_answer':
    metrics['exact_match'] = _math_verify_exact_match(runs, records)
    return metrics
  if not benchmark:
    answers = [majority_vote([extract_answer(run[i].text, r['answer']) for run in runs])
               for i, r in enumerate(records)]
    metrics['exact_match'] = sum(normalize(a) == normalize(r['answer'])
                                 for a, r in zip(answers, records)) / len(records)
    return metrics
  for name, extract in (('strict', benchmarks.strict_answer),
                        ('flexible', benchmarks.flexible_answer)):
    answers = [majority_vote([benchmarks.normalize_number(extract(run[i].text)) for run in runs])
               for i in range(len(records))]
    metrics[f'exact_match_{name}'] = sum(
        answer == benchmarks.normalize_number(r['answer'])
        for answer, r in zip(answers, records)) / len(records)
  if task.extract == 'chain_of_thought':  # GSM8K: also as the math reward compares them.
    metrics['exact_match_math_verify'] = _math_verify_exact_match(runs, records)
  return metrics


def _math_verify_exact_match(runs, records) -> float:
  """The share of records whose final answer (the majority by value over `runs`) equals
  their 'answer' as HF's math-verify compares them (lm/math_answers.py)."""
  answers = [_majority_by_value([math_answers.final_answer(run[i].text) for run in runs])
             for i in range(len(records))]
  return sum(math_answers.same(answer, r['answer'])
             for answer, r in zip(answers, records)) / len(records)


def as_chat(task: tasks_lib.Task, tokenizer) -> tasks_lib.Task:
  """`task` with each prompt (shots included) sent as one user message through the
  model's chat template, ending with the assistant's turn opening; the scorer adds bos
  itself, so the template's leading bos text is dropped."""
  if task.kind == 'perplexity':
    return task
  field = 'context' if task.kind == 'multiple_choice' else 'prompt'
  render = lambda text: chat.prompt_text(tokenizer, [{'role': 'user', 'content': text}])
  return dataclasses.replace(task, records=[{**r, field: render(r[field])} for r in task.records])
