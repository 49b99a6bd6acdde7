"""The rest of the engine's tests (tests/unit/test_engine.py has the first): a request's
tokens whatever shares its batch, prefix pages shared and copied on write, a group
prefilled once, no page leaked after any mix of ends, streamed text with a subword
tokenizer; and the unit tier's model tests on more models (a Transformer with a sliding
window whose decode steps run the paged Pallas kernel: the reference on the CPU,
pallas_kernels/paged_attention tests the kernel itself; a Mamba model)."""

import numpy as np
import pytest

from lm import tokenizer as tokenizer_lib
from lm.engine.engine import Engine, SamplingParams

from helpers import init_model, small_model_config
# The unit tier's tests that take `model_and_params` run again on this file's models.
from test_engine import (  # noqa: F401  pylint: disable=unused-import
    TOKENIZER, assert_all_pages_free, random_prompts,
    test_greedy_completions_are_the_static_samplers_with_requests_joining_midway)


TEXT_FOR_TOKENIZER = 'def greet(name):\n    """Say hello."""\n    return f"héllo {name} 🙂"\n'


@pytest.fixture(scope='module', params=[('attention', 'pallas', 20), ('mamba', 'xla', 0)])
def model_and_params(request):
  pattern, attention, window = request.param
  config = small_model_config(layer_pattern=pattern, attention=attention, vocab_size=260,
                              max_seq_len=128, sliding_window=window)
  return init_model(config, seed=1)


def test_a_seeded_request_samples_the_same_tokens_alone_and_admitted_mid_batch(
    model_and_params):
  model, params = model_and_params
  options = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=7,
                           stop_ids=())
  [prompt, *others] = random_prompts(1, [11, 30, 4, 50, 8])
  alone = Engine(model, params, TOKENIZER, slots=4, chunk=8).generate([prompt], options)[0]
  engine = Engine(model, params, TOKENIZER, slots=4, chunk=8)
  for index, other in enumerate(others):
    engine.add(other, SamplingParams(max_tokens=20, temperature=1.0, seed=index, stop_ids=()))
  tokens, texts = {}, {}
  for step in range(40):
    if step == 3:  # Joins a batch that is decoding and prefilling.
      request = engine.add(prompt, options)
    for output in engine.step():
      tokens.setdefault(output.request_id, []).extend(output.token_ids)
      texts[output.request_id] = texts.get(output.request_id, '') + output.text
  assert tokens[request] == alone.token_ids and texts[request] == alone.text
  # Another seed draws something else (a check that sampling is on).
  other = Engine(model, params, TOKENIZER, slots=4, chunk=8).generate(
      [prompt], SamplingParams(**{**options.__dict__, 'seed': 8}))[0]
  assert other.token_ids != alone.token_ids


def test_prompts_with_a_common_prefix_share_its_pages_and_generate_the_same():
  model, params = init_model(small_model_config(vocab_size=260, max_seq_len=128), seed=2)
  [prefix] = random_prompts(2, [48])  # Three pages of 16.
  tails = random_prompts(3, [5, 20])
  # Then two prompts of whole pages of it: their last token is recomputed in a copy.
  prompts = [prefix + tail for tail in tails] + [prefix, prefix[:32]]
  options = SamplingParams(max_tokens=8, stop_ids=())
  unshared = Engine(model, params, TOKENIZER, slots=4, prefix_caching=False).generate(
      prompts, options)
  engine = Engine(model, params, TOKENIZER, slots=4)
  outputs = {}
  def step():
    for output in engine.step():
      outputs.setdefault(output.request_id, []).extend(output.token_ids)
  first = engine.add(prompts[0], options)
  step()  # Its first chunk (64 tokens) writes the whole prefix.
  tables = {}
  later = [engine.add(prompt, options) for prompt in prompts[1:]]
  step()
  for request in engine._running:  # pylint: disable=protected-access
    if request is not None:
      tables[request.id] = list(request.pages)
  # The prefix's three pages are the first request's; a prompt of whole pages copies its
  # last page (its last token is recomputed there) and shares those before.
  assert tables[later[0]][:3] == tables[first][:3]
  assert tables[later[1]][:2] == tables[first][:2] and tables[later[1]][2] != tables[first][2]
  assert tables[later[2]][0] == tables[first][0] and tables[later[2]][1] != tables[first][1]
  assert engine.pool.holders(tables[first][0]) == 5  # Four requests and the cache.
  while engine.has_work():
    step()
  for request_id, completion in zip([first, *later], unshared):
    assert outputs[request_id] == completion.token_ids
  assert_all_pages_free(engine)


def test_a_group_of_equal_prompts_prefills_its_prefix_once():
  model, params = init_model(small_model_config(vocab_size=260, max_seq_len=128), seed=3)
  [prompt] = random_prompts(4, [40])
  engine = Engine(model, params, TOKENIZER, slots=4, chunk=16)
  ids = [engine.add(prompt, SamplingParams(max_tokens=4, temperature=1.0, seed=seed,
                                           stop_ids=())) for seed in range(4)]
  engine.step()  # The first request's first chunk; the others wait for its pages.
  running = [r for r in engine._running if r is not None]  # pylint: disable=protected-access
  assert [r.id for r in running] == ids[:1]
  engine.step()  # Its second chunk writes page 2 of 16: the others now share both.
  running = [r for r in engine._running if r is not None]  # pylint: disable=protected-access
  assert len(running) == 4 and len({tuple(r.pages[:2]) for r in running}) == 1
  assert all(r.computed == 32 for r in running[1:])
  while engine.has_work():
    engine.step()
  assert_all_pages_free(engine)


@pytest.mark.parametrize('seed', [0])
def test_no_page_is_leaked_after_any_mix_of_finished_stopped_and_cancelled_requests(seed):
  model, params = init_model(small_model_config(vocab_size=260, max_seq_len=96), seed=5)
  rng = np.random.default_rng(seed)
  # Fewer pages than the slots could hold: requests also wait for memory.
  engine = Engine(model, params, TOKENIZER, slots=4, page_size=8, num_pages=20, chunk=8)
  [prefix] = random_prompts(seed, [16])
  ids = []
  for step in range(60):
    if step < 30 and rng.random() < 0.5:
      prompt = random_prompts(step + 100 * seed, [int(rng.integers(1, 30))])[0]
      if rng.random() < 0.4:
        prompt = prefix + prompt
      options = SamplingParams(max_tokens=int(rng.integers(1, 30)),
                               temperature=float(rng.choice([0.0, 1.0])), seed=step,
                               stop_ids=tuple(int(t) for t in rng.integers(3, 259, size=3)))
      ids.append(engine.add(prompt[:96 - options.max_tokens], options))
    if ids and rng.random() < 0.15:
      engine.cancel(int(rng.choice(ids)))  # Waiting, running or already ended.
    engine.step()
  while engine.has_work():
    engine.step()
  assert_all_pages_free(engine)


def test_streamed_text_is_the_whole_decoding_with_a_subword_tokenizer(tmp_path):
  """The engine decodes a few ids per token (lm/engine: _detokenize); a sentencepiece
  tokenizer (spaces as '▁', byte fallback for unseen characters) must still stream exactly
  what decoding the whole completion gives, at every step."""
  texts = [TEXT_FOR_TOKENIZER * 3, 'the cat sat on the mat. ' * 40]
  tokenizer = tokenizer_lib.train_sentencepiece(texts, vocab_size=300,
                                                output_path=str(tmp_path / 'sp.model'))
  model, params = init_model(small_model_config(vocab_size=tokenizer.vocab_size,
                                                max_seq_len=128), seed=8)
  engine = Engine(model, params, tokenizer, slots=4, chunk=8)
  prompts = [tokenizer.prompt_ids(text) for text in ('def greet(', 'the cat', 'x = [1,')]
  ids = [engine.add(p, SamplingParams(max_tokens=40, temperature=1.0, seed=i, stop_ids=()))
         for i, p in enumerate(prompts)]
  tokens, streamed = {i: [] for i in ids}, {i: '' for i in ids}
  while engine.has_work():
    for output in engine.step():
      tokens[output.request_id] += output.token_ids
      streamed[output.request_id] += output.text
      # Never ahead of the whole decoding: a prefix of it at every step.
      assert tokenizer.decode(tokens[output.request_id]).startswith(streamed[output.request_id])
  for request in ids:
    assert streamed[request] == tokenizer.decode(tokens[request]) and tokens[request]
