"""The built-in arithmetic word problems (lm/data/arithmetic.py): solutions that are right
step by step, graded difficulty, a held-out split by text, and the rows and rewards the
objectives read from them."""

import re

import ml_collections
import numpy as np

from lm import objectives, tokenizer as tokenizer_lib
from lm.data import arithmetic, pipeline, sources
from lm.objectives import rewards

TOKENIZER = tokenizer_lib.ByteTokenizer()
STEP = re.compile(r'(\d+) ([-+*/]) (\d+) = (\d+)\.')


def data_config(source='arithmetic'):
  return ml_collections.ConfigDict(dict(source=source, path='', bad_records='error'))


def test_each_solution_is_right_step_by_step_and_ends_with_its_answer():
  problems = arithmetic.Problems(600)
  for index in range(len(problems)):
    [example] = problems[index]
    steps = STEP.findall(example['response'])
    assert len(steps) == 1 + index % arithmetic.MAX_STEPS, example  # Graded difficulty.
    have = int(re.search(r' has (\d+) ', example['prompt']).group(1))
    for a, op, b, c in steps:  # Each step starts from the last one's result.
      assert int(a) == have
      have = {'+': int(a) + int(b), '-': int(a) - int(b), '*': int(a) * int(b),
              '/': int(a) // int(b)}[op]
      assert have == int(c) and have >= 0 and (op != '/' or int(a) % int(b) == 0)
    assert example['answer'] == str(have) and example['response'].endswith(f'#### {have}\n')
    assert rewards.math(example, example['response'], True) == 1.0
    assert rewards.math(example, f' #### {have + 1}', True) == 0.0


def test_the_problems_are_the_same_every_time_and_split_by_their_text():
  assert arithmetic.Problems(50).problems == arithmetic.Problems(50).problems
  problems = arithmetic.Problems(3000)
  train, held_out = sources.split(problems, 0.1)
  texts = lambda subset: {subset[i][0]['prompt'] for i in range(len(subset))}
  assert not texts(train) & texts(held_out)
  assert 0.07 < len(held_out) / len(problems) < 0.13


def test_sft_grpo_and_pretraining_read_the_task():
  sft, grpo, pretrain = (objectives.OBJECTIVES[name] for name in ('sft', 'grpo', 'pretrain'))
  source = sft.source(data_config())
  [batch] = list(pipeline.make_dataset(sources.Subset(source, [0]), sft, TOKENIZER,
                                       seq_len=256, batch_size=1, seed=0, train=False))
  [example] = source[0]
  tokens, mask = batch['tokens'][0], batch['loss_mask'][0]
  # SFT trains on the worked solution, not the question.
  assert TOKENIZER.decode(tokens[mask == 1]) == example['response']
  assert grpo.source(data_config())[0] == [example]  # The answer, for the math reward.
  assert pretrain.source(data_config())[0] == example['prompt'] + example['response']
  assert np.sum(mask) > 0


def test_each_pair_rejects_a_solution_that_slips_once_and_ends_wrong():
  problems = arithmetic.Problems(600, pairs=True)
  for index in range(len(problems)):
    [example] = problems[index]
    assert example['chosen'] == example['response']
    right, wrong = STEP.findall(example['chosen']), STEP.findall(example['rejected'])
    assert [(op, b) for _, op, b, _ in wrong] == [(op, b) for _, op, b, _ in right]
    # Wrong from one step on: a line whose result is not its arithmetic (or whose start
    # carries an earlier slip), and a final number that is not the answer.
    slips = [int(c) != {'+': int(a) + int(b), '-': int(a) - int(b), '*': int(a) * int(b),
                        '/': int(a) // int(b)}[op] for a, op, b, c in wrong]
    assert any(slips), example
    final = example['rejected'].split('####')[1].strip()
    assert final == wrong[-1][3] != example['answer']
  # Each problem's pair comes from its own generator: the same in every instance.
  assert arithmetic.Problems(600, pairs=True)[7] == problems[7]
