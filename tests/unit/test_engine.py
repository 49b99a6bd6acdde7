"""The generation engine (lm/engine): what it generates against lm.sampling.generate, a
request's tokens whatever shares its batch, prefix pages shared and copied on write, stop
strings, and pages accounted for after any mix of ends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import sampling
from lm.engine import pages as pages_lib
from lm.engine.engine import Engine, SamplingParams
from lm.tokenizer import ByteTokenizer

from helpers import init_model, small_model_config

TOKENIZER = ByteTokenizer()


# (layer pattern, attention, sliding window); tests/integration/test_engine_grid.py runs
# the tests that take `model_and_params` on more.
MODELS = [('attention', 'xla', 0), ('mamba,attention', 'xla', 0)]


@pytest.fixture(scope='module', params=MODELS)
def model_and_params(request):
  """A Transformer and a hybrid."""
  pattern, attention, window = request.param
  config = small_model_config(layer_pattern=pattern, attention=attention, vocab_size=260,
                              max_seq_len=128, sliding_window=window)
  return init_model(config, seed=1)


def random_prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(3, 259, size=n)] for n in lengths]


def static_batch(model, params, prompts, max_tokens):
  """lm.sampling.generate on the prompts in one static batch, greedy: the old sampler."""
  prompts_bt, lengths_b = sampling.pad_prompts(prompts, pad_id=0)
  new, count = sampling.generate(
      params, jnp.asarray(prompts_bt), jnp.asarray(lengths_b), jax.random.key(0),
      jnp.asarray([], jnp.int32), model=model, max_new_tokens=max_tokens,
      cache_length=prompts_bt.shape[1] + max_tokens)
  return [[int(t) for t in row[:n]] for row, n in zip(np.asarray(new), np.asarray(count))]


def assert_all_pages_free(engine):
  engine.pool.clear_cache()
  assert engine.pool.free_count() == engine.pool.num_pages - 1
  assert all(engine.pool.holders(page) == 0 for page in range(engine.pool.num_pages))
  assert not engine.has_work() and not engine._writing  # pylint: disable=protected-access


def test_greedy_completions_are_the_static_samplers_with_requests_joining_midway(
    model_and_params):
  """More requests than slots, prompts longer than a chunk and shorter than a page: each
  request's greedy tokens are those lm.sampling.generate gives it alone."""
  model, params = model_and_params
  prompts = random_prompts(0, [3, 17, 40, 5, 33, 70, 16, 1, 9, 32])
  engine = Engine(model, params, TOKENIZER, slots=3, page_size=16, chunk=16)
  completions = engine.generate(prompts, SamplingParams(max_tokens=12, stop_ids=()))
  for prompt, completion, static in zip(prompts, completions,
                                        static_batch(model, params, prompts, 12)):
    assert completion.token_ids == static, len(prompt)
    assert completion.finish_reason == 'length'
  assert_all_pages_free(engine)


def test_stop_strings_cut_the_text_and_streamed_text_adds_up():
  model, params = init_model(small_model_config(vocab_size=260, max_seq_len=128), seed=4)
  [prompt] = random_prompts(5, [6])
  engine = Engine(model, params, TOKENIZER, slots=2)
  full = engine.generate([prompt], SamplingParams(max_tokens=30, stop_ids=()))[0]
  stop = full.text[7:9]  # A string the completion holds: it ends just before it.
  assert stop and full.text.find(stop) >= 0
  cut = full.text[:full.text.find(stop)]
  request = engine.add(prompt, SamplingParams(max_tokens=30, stop=(stop, 'never seen'),
                                              stop_ids=()))
  streamed, outputs = '', []
  while engine.has_work():
    outputs += [o for o in engine.step() if o.request_id == request]
    streamed += ''.join(o.text for o in outputs[-1:])
  assert streamed == cut and outputs[-1].finished and outputs[-1].finish_reason == 'stop'
  assert all(not o.finished for o in outputs[:-1])
  # A stop id ends it too, the id reported but not its text.
  stop_id = full.token_ids[3]
  [stopped] = engine.generate([prompt], SamplingParams(max_tokens=30, stop_ids=(stop_id,)))
  assert stopped.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
  assert stopped.finish_reason == 'stop'
  assert_all_pages_free(engine)


def test_requests_that_cannot_fit_or_have_bad_options_are_refused_in_one_line():
  model, params = init_model(small_model_config(vocab_size=260, max_seq_len=64))
  engine = Engine(model, params, TOKENIZER, slots=2)
  for prompt, options, message in [
      ([5] * 60, SamplingParams(max_tokens=5), 'exceed the context of 64 tokens'),
      ([], SamplingParams(), 'at least one token'),
      ([5], SamplingParams(max_tokens=0), 'max_tokens=0'),
      ([5], SamplingParams(temperature=-1.0), 'temperature=-1.0'),
      ([5], SamplingParams(top_p=0.0), 'top_p=0.0'),
      ([5], SamplingParams(top_k=-2), 'top_k=-2'),
      ([5], SamplingParams(stop=('',)), 'non-empty'),
      ([999], SamplingParams(), 'prompt ids must be in [0, 260)')]:
    with pytest.raises(ValueError, match=message.replace('[', r'\[').replace('(', r'\(')
                       .replace(')', r'\)')) as error:
      engine.add(prompt, options)
    assert '\n' not in str(error.value)
  assert not engine.has_work()
  small = Engine(model, params, TOKENIZER, slots=2, page_size=8, num_pages=4)
  with pytest.raises(ValueError, match='need 4 pages of 8; the engine has 3'):
    small.add([5] * 20, SamplingParams(max_tokens=5))


def allowed_ids(logits, temperature, top_k, top_p):
  """The ids sampling may draw, from the definitions: the top k by logit, then the
  smallest set of the highest whose probability reaches top_p."""
  order = np.argsort(-logits, kind='stable')
  kept = order[:top_k] if top_k else order
  probabilities = np.exp((logits[kept] - logits[kept].max()) / temperature)
  probabilities /= probabilities.sum()
  before = np.cumsum(probabilities) - probabilities
  return set(kept[before < top_p].tolist()), dict(zip(kept.tolist(), probabilities))


def test_sample_rows_draws_from_each_rows_own_top_k_and_top_p_set():
  rng = np.random.default_rng(0)
  options = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 8, 0.5)]
  logits = rng.normal(size=(len(options), 40)).astype(np.float32) * 2
  temperature, top_k, top_p = (np.array(column) for column in zip(*options))
  draws = jax.jit(jax.vmap(lambda index: sampling.sample_rows(
      jnp.asarray(logits), jax.vmap(jax.random.key)(jnp.arange(len(options))),
      jnp.full(len(options), index),
      jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
      jnp.asarray(top_p, jnp.float32))))(jnp.arange(4000))
  draws = np.asarray(draws)
  assert (draws[:, 0] == logits[0].argmax()).all()  # Greedy.
  for row in range(1, len(options)):
    allowed, probabilities = allowed_ids(logits[row], *options[row])
    assert set(draws[:, row].tolist()) <= allowed
    # Frequencies of the allowed ids: their probabilities renormalised, within 4 sigma.
    total = sum(probabilities[i] for i in allowed)
    for token in allowed:
      expected = probabilities[token] / total
      seen = np.mean(draws[:, row] == token)
      assert abs(seen - expected) < 4 * np.sqrt(expected * (1 - expected) / 4000) + 1e-3


def test_the_page_pool_counts_holders_and_evicts_only_unheld_cached_pages():
  pool = pages_lib.PagePool(num_pages=5, page_size=4)
  a = pool.allocate(2)
  key = pool.key(None, [1, 2, 3, 4])
  pool.cache(key, a[0])
  pool.release(a)
  assert pool.free_count() == 3 and pool.available() == 4 and pool.lookup(key) == a[0]
  b = pool.allocate(4)  # Evicts the cached page nobody else holds.
  assert pool.lookup(key) is None and a[0] in b
  with pytest.raises(pages_lib.OutOfPages):
    pool.allocate(1)
  pool.release(b)
  assert pool.free_count() == 4


def test_seeded_sampling_gives_the_static_samplers_rows():
  """lm.sampling.complete_ids' row i with seed s samples as an engine request with seed
  s + i, whatever shares either batch."""
  model, params = init_model(small_model_config(vocab_size=260, max_seq_len=128), seed=6)
  prompts = random_prompts(7, [5, 23, 2, 40])
  options = dict(max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.95, stop_ids=(),
                 seed=11)
  static = sampling.complete_ids(model, params, TOKENIZER, prompts, **options)
  engine = Engine(model, params, TOKENIZER, slots=2, chunk=8)
  completions = engine.generate(prompts[::-1], [
      SamplingParams(max_tokens=12, temperature=0.8, top_k=40, top_p=0.95, stop_ids=(),
                     seed=11 + index) for index in reversed(range(len(prompts)))])
  assert [c.text for c in completions[::-1]] == static
  assert len(set(static)) == len(static)
