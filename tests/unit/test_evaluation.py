import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import tokenizer as tokenizer_lib
from lm.data import sources
from lm.errors import ConfigError
from lm.evaluation import builtin, harness, scoring, tasks

from helpers import ChoicesOneByOne, init_model, jit_apply, small_model_config


@pytest.fixture(scope='module')
def scorer():
  tokenizer = tokenizer_lib.ByteTokenizer()
  config = small_model_config(vocab_size=tokenizer.vocab_size, tie_embeddings=True)
  model, params = init_model(config, length=8)
  return scoring.Scorer(model, params, tokenizer, max_length=64, batch_size=4)


def reference_log_probs(scorer, ids):
  """log p(ids[i] | ids[:i]) for i >= 1, from one plain forward pass."""
  tokens = jnp.asarray([ids])
  logits = jit_apply(scorer.model)({'params': scorer.params}, tokens, jnp.ones_like(tokens),
                                   jnp.arange(len(ids))[None])[0]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return np.array([log_probs[i - 1, ids[i]] for i in range(1, len(ids))])


def test_continuation_log_likelihood_matches_a_plain_forward_pass(scorer):
  pairs = [('def f(x):', ' return x'), ('a', 'b'), ('hello', ' world!'), ('', 'xyz'), ('q', 'r')]
  got = scorer.continuation_log_likelihoods(pairs)
  for (context, continuation), (log_likelihood, count, *_) in zip(pairs, got):
    ids = [1, *scorer.tokenizer.encode(context), *scorer.tokenizer.encode(continuation)]
    want = reference_log_probs(scorer, ids)[-len(continuation.encode()):].sum()
    assert count == len(continuation.encode())
    np.testing.assert_allclose(log_likelihood, want, rtol=1e-5)


def test_long_documents_are_scored_in_windows_that_predict_every_token_once(scorer):
  text = 'windows of sixty-four bytes overlap by one token each. ' * 3
  log_likelihood, count = scorer.document_log_likelihood(text)
  ids = [1, *scorer.tokenizer.encode(text), 2]
  assert count == len(ids) - 1
  # The first window equals a plain forward pass over its 64 tokens.
  first_window, _ = scorer.document_log_likelihood(text[:40])
  np.testing.assert_allclose(
      first_window, reference_log_probs(scorer, [1, *scorer.tokenizer.encode(text[:40]), 2]).sum(),
      rtol=1e-5)
  assert log_likelihood < first_window < 0


class FakeScorer(ChoicesOneByOne):
  """Returns preset log-likelihoods and completions, to test the metrics alone."""

  def __init__(self, log_likelihoods=None, completions_by_seed=None):
    self.log_likelihoods, self.completions_by_seed = log_likelihoods, completions_by_seed

  def continuation_log_likelihoods(self, pairs):
    return [scoring.Score(self.log_likelihoods[continuation], 1, False)
            for _, continuation in pairs]

  def complete(self, prompts, *, max_new_tokens, temperature, seed, stops=()):
    return [scoring.Completion(text) for text in self.completions_by_seed[seed][:len(prompts)]]


def test_length_normalised_accuracy_can_prefer_the_longer_choice():
  task = tasks.Task('t', 'multiple_choice', [
      {'context': 'c', 'choices': [' a', ' a much longer right answer'], 'answer': 1}])
  fake = FakeScorer({' a': -2.0, ' a much longer right answer': -3.0})
  metrics = harness.evaluate(task, fake)
  assert metrics['accuracy'] == 0.0  # -2 > -3
  assert metrics['accuracy_normalized'] == 1.0  # -3/27 > -2/2


def test_multiple_choice_accuracy_picks_each_records_best_choice_wherever_the_answer_is():
  """Answers at indices 0, 1 and 2; normalised by bytes ('é' is two), not by characters
  nor by the scorer's token counts (here 1 per choice, so a per-token score is the sum)."""
  records = [  # (choices, answer, log-likelihoods), scored by hand on the right.
      ([' a', ' bb', ' ccc'], 2, [-1.0, -2.0, -1.6]),  # sum picks 0; per byte -.5 -.67 -.4: 2
      ([' yes', ' no'], 0, [-1.0, -1.5]),  # sum 0; per byte -.25 -.5: 0
      ([' x', ' yy', ' zzzz', ' w'], 1, [-3.0, -0.9, -2.0, -2.5]),  # sum 1; -1.5 -.3 -.4 -1.25: 1
      ([' p', ' qqqqqqq', ' r'], 1, [-1.2, -2.0, -3.0]),  # sum 0; -.6 -.25 -1.5: 1
      ([' m', ' éé'], 1, [-0.6, -1.4]),  # sum 0; per byte -.3 -.28: 1 (per character -.47: 0)
      ([' k', ' ll'], 1, [-0.5, -3.0]),  # sum 0; per byte -.25 -1: 0
  ]
  task = tasks.Task('t', 'multiple_choice', [
      {'context': f'q{i}', 'choices': choices, 'answer': answer}
      for i, (choices, answer, _) in enumerate(records)])
  scores = {(f'q{i}', choice): log_likelihood for i, (choices, _, log_likelihoods)
            in enumerate(records) for choice, log_likelihood in zip(choices, log_likelihoods)}

  class OneTokenPerChoice(ChoicesOneByOne):
    def continuation_log_likelihoods(self, pairs):
      return [scoring.Score(scores[pair], 1, False) for pair in pairs]

  metrics = harness.evaluate(task, OneTokenPerChoice())
  assert metrics == {'accuracy': 2 / 6, 'accuracy_normalized': 5 / 6, 'examples': 6,
                     'truncated': 0}


def test_exact_match_and_self_consistency_majority_vote():
  task = tasks.Task('t', 'generation', [{'prompt': 'p1', 'answer': ' 12'},
                                         {'prompt': 'p2', 'answer': ' Paris'}])
  greedy = FakeScorer(completions_by_seed={0: [' 12 apples\nmore', ' paris']})
  assert harness.evaluate(task, greedy)['exact_match'] == 1.0
  samples = FakeScorer(completions_by_seed={0: [' 13', ' Rome'], 1000: [' 12', ' Paris'],
                                            2000: [' 12.', ' Paris']})
  metrics = harness.evaluate(task, samples, self_consistency=3)
  assert metrics['exact_match'] == 1.0 and metrics['self_consistency'] == 3


def test_answer_extraction():
  assert harness.extract_answer(' The answer is -42, clearly.\nQ:', ' -42') == '-42'
  assert harness.extract_answer(' Paris\nQ: next', ' Paris') == 'Paris'
  assert harness.majority_vote(['a', 'b', 'b', 'a', 'c']) == 'a'


def test_task_files_set_their_kind_and_bad_records_are_named(tmp_path):
  path = tmp_path / 'capitals.jsonl'
  path.write_text('{"prompt": "Capital of France?", "answer": " Paris"}\n\n'
                  '{"prompt": "Capital of Peru?", "answer": " Lima"}\n')
  task = tasks.load(str(path))
  assert (task.name, task.kind, len(task.records)) == ('capitals', 'generation', 2)
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"context": "x", "choices": [" a", " b"], "answer": 2}\n')
  with pytest.raises(ConfigError, match=r'bad.jsonl:1: "answer" must be an index'):
    tasks.load(str(bad))
  bad.write_text('{"question": "x"}\n')
  with pytest.raises(ConfigError, match=r'bad.jsonl:1: fields \[.question.\] match no task kind'):
    tasks.load(str(bad))
  bad.write_text('{"prompt": "p", "answer": "a \\ud800"}\n')
  with pytest.raises(ConfigError, match=r'bad.jsonl:1 holds .\\ud800., a lone surrogate'):
    tasks.load(str(bad))
  bad.write_text('{"text": "x"}\n{"prompt": "p", "answer": "a"}\n')
  with pytest.raises(ConfigError, match=r'bad.jsonl:2 is a generation record in a perplexity task'):
    tasks.load(str(bad))


def test_few_shot_prefixes_use_other_solved_examples_deterministically():
  task = builtin.arithmetic(num_examples=10)
  prefix = tasks.few_shot_prefix(task, 3, num_shots=2, seed=0)
  assert prefix == tasks.few_shot_prefix(task, 3, num_shots=2, seed=0)
  assert prefix.count('Q:') == 2 and prefix.endswith('\n\n')
  assert tasks.solved(task.records[3], task) not in prefix


def test_builtin_arithmetic_answers_are_right():
  for record in builtin.arithmetic(num_examples=50).records:
    a, operator, b = re.search(r'What is (\d+) ([+-]) (\d+)\?', record['prompt']).groups()
    assert int(record['answer']) == (int(a) + int(b) if operator == '+' else int(a) - int(b))
  for record in builtin.arithmetic_choice(num_examples=50).records:
    a, b = map(int, re.findall(r'\d+', record['context']))
    assert int(record['choices'][record['answer']]) == a + b
    assert len(set(record['choices'])) == 4


def test_worked_solutions_are_scored_by_their_final_answer():
  task = builtin.arithmetic_problems()
  # The problems that training on config.data.source='arithmetic' holds out.
  assert 700 < len(task.records) < 1300
  assert all(sources.is_validation(r['prompt'], 0.05) for r in task.records)
  assert task.stops == ('\nQuestion:',) and task.extract == 'final_answer'
  two = tasks.Task('t', 'generation', [{'prompt': 'p1', 'answer': '14'},
                                       {'prompt': 'p2', 'answer': '0.5'}],
                   stops=task.stops, extract=task.extract)
  right = FakeScorer(completions_by_seed={0: [' 7 * 2 = 14.\n#### 14', ' so \\boxed{1/2}']})
  assert harness.evaluate(two, right)['exact_match'] == 1.0
  wrong = FakeScorer(completions_by_seed={0: [' 7 * 2 = 14.\n#### 15', ' 1/2 of it']})
  assert harness.evaluate(two, wrong)['exact_match'] == 0.5
  # Majority by value: 14 and 14.0, 0.5 and 1/2 vote together.
  votes = FakeScorer(completions_by_seed={0: [' #### 13', ' 2'], 1000: [' #### 14', ' 0.5'],
                                          2000: [' #### 14.0', ' 1/2']})
  assert harness.evaluate(two, votes, self_consistency=3)['exact_match'] == 1.0


@pytest.mark.parametrize('layer_pattern', ['attention', 'mamba,attention'])
def test_choices_scored_from_one_context_pass_equal_scoring_each_pair(layer_pattern):
  tokenizer = tokenizer_lib.ByteTokenizer()
  config = small_model_config(vocab_size=tokenizer.vocab_size, tie_embeddings=True,
                              layer_pattern=layer_pattern)
  model, params = init_model(config, length=8)
  scorer = scoring.Scorer(model, params, tokenizer, max_length=64, batch_size=2)
  records = [('the sky is', [' blue', ' red', ' a long grey colour']),
             ('q', [' r', ' s']),
             ('def f(x):\n    return', [' x', ' x + 1', ' None', ' f(x)']),
             ('x' * 60, [' too long for one pass'])]  # Cut at the context's start instead.
  got = scorer.choice_log_likelihoods(records)
  want = scorer.continuation_log_likelihoods(
      [(context, choice) for context, choices in records for choice in choices])
  flat = [choice for record in got for choice in record]
  assert [c[1:] for c in flat] == [w[1:] for w in want]  # Token counts, greedy flags.
  np.testing.assert_allclose([c[0] for c in flat], [w[0] for w in want], rtol=1e-5, atol=1e-5)


class _HarnessEncoder:
  """What lm-evaluation-harness's Hugging Face backend needs to run its own pair encoding
  (`TemplateLM._encode_pair`) with a transformers tokenizer."""
  backend = 'causal'

  def __init__(self, auto):
    self.auto = auto

  def tok_encode(self, string, add_special_tokens=None, **_):
    kwargs = {} if add_special_tokens is None else {'add_special_tokens': add_special_tokens}
    return self.auto.encode(string, **kwargs)


@pytest.mark.parametrize('layout', ['llama3', 'qwen'])
def test_context_and_continuation_are_encoded_as_the_harness_encodes_them(tmp_path, layout):
  import transformers  # pylint: disable=import-outside-toplevel
  from lm_eval.api.model import TemplateLM  # pylint: disable=import-outside-toplevel
  import test_hf_tokenizer  # pylint: disable=import-outside-toplevel
  directory = getattr(test_hf_tokenizer, f'write_{layout}_like')(tmp_path / layout)
  tokenizer = tokenizer_lib.from_hf_directory(directory)
  harness_lm = _HarnessEncoder(transformers.AutoTokenizer.from_pretrained(directory))
  scorer = scoring.Scorer(None, None, tokenizer, max_length=64)
  pairs = [('Question: what is 2 + 2?\nAnswer:', ' 4'), ('The sky is ', 'blue.'),
           ('A cat sat on the', ' mat'), ('naïve café', ' déjà vu'), ('x  ', '  y')]
  for context, continuation in pairs:
    assert scorer.encode_pair(context, continuation) == tuple(
        TemplateLM._encode_pair(harness_lm, context, continuation)), (context, continuation)
  # An empty context is the prefix token (the harness's prefix_token_id).
  assert scorer.encode_pair('', ' mat') == (
      [tokenizer.prefix_id], harness_lm.auto.encode(' mat', add_special_tokens=False))


def test_a_context_longer_than_the_window_loses_its_start_as_the_harness_cuts_it(scorer):
  """The model reads the last max_length tokens of context + continuation minus the last
  one, as the harness's (context + continuation)[-(max_length + 1):][:-1]."""
  context, continuation = 'a long context of bytes ' * 4 + 'and', ' its end'
  [score] = scorer.continuation_log_likelihoods([(context, continuation)])
  ids = [1, *scorer.tokenizer.encode(context), *scorer.tokenizer.encode(continuation)]
  kept = ids[-(scorer.max_length + 1):]
  want = reference_log_probs(scorer, kept)[-len(continuation):].sum()
  np.testing.assert_allclose(score.log_likelihood, want, rtol=1e-5)
  assert score.truncated and score.tokens == len(continuation)
  [short] = scorer.continuation_log_likelihoods([('short', continuation)])
  assert not short.truncated


def test_generation_prompts_keep_their_end_and_room_for_the_answer(scorer):
  ids, truncated = scorer.generation_prompts(['x' * 100, 'short'], max_new_tokens=16)
  assert ids[0] == [*scorer.tokenizer.encode('x' * 100)][-(64 - 16):] and truncated[0]
  assert ids[1] == [1, *scorer.tokenizer.encode('short')] and not truncated[1]
  with pytest.raises(ConfigError, match='--max_new_tokens=64 leaves no room'):
    scorer.generation_prompts(['x'], max_new_tokens=64)


def test_the_context_is_the_models_own_unless_lowered():
  """An imported model's max_position_embeddings; a model trained here, its rows."""
  from experiments.configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  assert (config.model.max_seq_len, config.data.seq_len) == (1024, 128)
  assert scoring.context_length(config, trained_here=False) == 1024
  assert scoring.context_length(config, trained_here=True) == 128
  assert scoring.context_length(config, True, max_length=512) == 512
  with pytest.raises(ConfigError, match=r'--max_length=1025 must be in \[2, config.model.max_seq_len=1024\]'):
    scoring.context_length(config, False, 1025)


def test_documents_of_a_checkpoint_tokenizer_are_scored_as_the_harness_does(tmp_path):
  import test_hf_tokenizer  # pylint: disable=import-outside-toplevel
  llama3 = tokenizer_lib.from_hf_directory(test_hf_tokenizer.write_llama3_like(tmp_path / 'l'))
  qwen = tokenizer_lib.from_hf_directory(test_hf_tokenizer.write_qwen_like(tmp_path / 'q'))
  text = 'Hello, world!'
  # The harness: prefix_token_id, then tok_encode(text) (the tokenizer's bos included).
  assert scoring.document_ids(llama3, text) == [llama3.prefix_id, llama3.bos_id,
                                                *llama3.encode(text)]
  assert scoring.document_ids(qwen, text) == [qwen.eos_id, *qwen.encode(text)]
  byte = tokenizer_lib.ByteTokenizer()  # Trained here: bos, text, eos, as lm trains.
  assert scoring.document_ids(byte, text) == [1, *byte.encode(text), 2]
