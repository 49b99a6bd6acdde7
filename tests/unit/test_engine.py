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
from lm import tokenizer as tokenizer_lib
from lm.tokenizer import ByteTokenizer

from helpers import init_model, small_model_config

TOKENIZER = ByteTokenizer()
TEXT_FOR_TOKENIZER = 'def greet(name):\n    """Say hello."""\n    return f"héllo {name} 🙂"\n'


@pytest.fixture(scope='module', params=[('attention', 'xla', 0), ('mamba,attention', 'xla', 0),
                                       ('attention', 'pallas', 20), ('attention', 'xla', 20)])
def model_and_params(request):
  """A Transformer, a hybrid, and Transformers with a sliding window, one whose decode
  steps run the paged Pallas kernel (the reference on the CPU;
  pallas_kernels/paged_attention tests the kernel)."""
  pattern, attention, window = request.param
  config = small_model_config(layer_pattern=pattern, attention=attention, vocab_size=260,
                              max_seq_len=128, sliding_window=window)
  return init_model(config, seed=1)


def random_prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(3, 259, size=n)] for n in lengths]


def static_batch(model, params, prompt, max_tokens, stop_ids=()):
  """lm.sampling.generate on the prompt alone, greedy: the old sampler."""
  new, count = sampling.generate(
      params, jnp.asarray([prompt]), jnp.asarray([len(prompt)]), jax.random.key(0),
      jnp.asarray(stop_ids, jnp.int32), model=model, max_new_tokens=max_tokens,
      cache_length=len(prompt) + max_tokens)
  return [int(t) for t in np.asarray(new[0])[:int(count[0])]]


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
  for prompt, completion in zip(prompts, completions):
    assert completion.token_ids == static_batch(model, params, prompt, 12), len(prompt)
    assert completion.finish_reason == 'length'
  assert_all_pages_free(engine)


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


@pytest.mark.parametrize('seed', [0, 1])
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
