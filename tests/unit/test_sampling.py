import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm import sampling, tokenizer as tokenizer_lib

from helpers import init_model, jit_apply, small_model_config


@pytest.fixture(scope='module')
def model_and_params():
  return init_model(small_model_config(vocab_size=61, remat='full'), length=8)


def full_forward(model, params, ids):
  tokens = jnp.asarray(ids, jnp.int32)[None]
  positions = jnp.arange(len(ids))[None]
  return jit_apply(model)({'params': params}, tokens, jnp.ones_like(tokens), positions)[0]


def test_cached_decoding_gives_the_logits_of_a_full_forward_pass_for_ragged_prompts(
    model_and_params):
  model, params = model_and_params
  rng = np.random.default_rng(0)
  lengths = [3, 8, 5]
  continuation = rng.integers(3, 61, (3, 6))  # Teacher-forced: 2 single tokens, then chunks.
  prompts, lengths_b = sampling.pad_prompts(
      [list(rng.integers(3, 61, n)) for n in lengths], pad_id=0, multiple=8)
  cache = sampling.init_cache(model, batch_size=3, cache_length=20)
  compiled = jit_apply(model)

  def apply(cache, tokens_bt, positions_bt):
    logits, variables = compiled(
        {'params': params, 'cache': cache}, jnp.asarray(tokens_bt, jnp.int32),
        jnp.ones_like(tokens_bt), jnp.asarray(positions_bt), decode=True)
    return logits, variables['cache']

  segment_ids = (np.arange(8)[None] < lengths_b[:, None]).astype(np.int32)
  logits, variables = compiled(
      {'params': params, 'cache': cache}, jnp.asarray(prompts), jnp.asarray(segment_ids),
      jnp.broadcast_to(jnp.arange(8), (3, 8)), decode=True)
  cache = variables['cache']
  pieces = [logits]
  start = 0
  for size in (1, 1, 2, 2):
    positions = lengths_b[:, None] + start + np.arange(size)[None]
    step_logits, cache = apply(cache, continuation[:, start:start + size], positions)
    pieces.append(step_logits)
    start += size

  # The full forward of every row over one fixed-length buffer (a single compilation):
  # causal, so the zeros after a row's ids do not reach their logits.
  rows = [list(prompts[row, :length]) + list(continuation[row])
          for row, length in enumerate(lengths)]
  width = max(map(len, rows))
  full = compiled({'params': params},
                  jnp.asarray([row + [0] * (width - len(row)) for row in rows], jnp.int32),
                  jnp.ones((len(rows), width), jnp.int32),
                  jnp.broadcast_to(jnp.arange(width), (len(rows), width)))
  for row, length in enumerate(lengths):
    want = full[row, :len(rows[row])]
    got = np.concatenate([pieces[0][row, :length]] + [p[row] for p in pieces[1:]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('max_new_tokens', [1, 10])  # 1: the prefill's logits alone.
def test_greedy_generation_matches_argmax_of_full_recomputation(model_and_params,
                                                                 max_new_tokens):
  model, params = model_and_params
  prompts = [[1, 5, 9], [1, 7, 7, 7, 30, 2, 4], [1]]
  prompts_bp, lengths_b = sampling.pad_prompts(prompts, pad_id=0, multiple=8)
  new_bn, num_new_b = sampling.generate(
      params, jnp.asarray(prompts_bp), jnp.asarray(lengths_b), jax.random.key(0),
      jnp.asarray([-1]), model=model, max_new_tokens=max_new_tokens, cache_length=24)
  assert np.asarray(num_new_b).tolist() == [max_new_tokens] * 3
  # The full forward over one fixed-length buffer (a single compilation): causal, so the
  # zeros after the ids do not reach the last id's logits.
  forward = jax.jit(lambda tokens: full_forward(model, params, tokens))
  for row, prompt in enumerate(prompts):
    ids = list(prompt)
    for _ in range(max_new_tokens):
      logits = forward(jnp.asarray(ids + [0] * (24 - len(ids))))
      ids.append(int(jnp.argmax(logits[len(ids) - 1])))
    assert np.asarray(new_bn[row]).tolist() == ids[len(prompt):]


def test_a_stop_id_ends_its_row_and_pads_the_rest(model_and_params):
  model, params = model_and_params
  prompts_bp, lengths_b = sampling.pad_prompts([[1, 5, 9], [1, 8]], pad_id=0, multiple=8)
  args = (params, jnp.asarray(prompts_bp), jnp.asarray(lengths_b), jax.random.key(0))
  free, _ = sampling.generate(*args, jnp.asarray([-1]), model=model, max_new_tokens=8,
                              cache_length=16)
  stop = int(free[0, 2])  # Whatever row 0 emits third becomes the stop id.
  first_stop = int(np.argmax(np.asarray(free[0]) == stop))
  new_bn, num_new_b = sampling.generate(*args, jnp.asarray([stop]), model=model,
                                        max_new_tokens=8, cache_length=16)
  assert int(num_new_b[0]) == first_stop + 1
  assert np.asarray(new_bn[0, :first_stop + 1]).tolist() == np.asarray(free[0, :first_stop + 1]).tolist()
  assert (np.asarray(new_bn[0, first_stop + 1:]) == 0).all()


def test_top_k_and_top_p_restrict_what_can_be_sampled():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  def support(temperature, top_k, top_p):
    draws = jax.vmap(lambda index: sampling.sample_rows(
        logits, jax.random.key(0)[None], index[None], jnp.array([temperature]),
        jnp.array([top_k]), jnp.array([top_p])))(jnp.arange(2000))
    return set(np.asarray(draws).ravel().tolist())
  assert support(temperature=1.0, top_k=0, top_p=1.0) == {0, 1, 2, 3}
  assert support(temperature=1.0, top_k=2, top_p=1.0) == {0, 1}
  assert support(temperature=1.0, top_k=0, top_p=0.7) == {0, 1}
  assert support(temperature=1.0, top_k=0, top_p=0.5) == {0}
  assert support(temperature=0.0, top_k=0, top_p=1.0) == {0}


def test_sampling_is_seeded_and_text_round_trips(model_and_params):
  model, params = model_and_params
  tokenizer = tokenizer_lib.ByteTokenizer()
  model, params = init_model(ml_collections.FrozenConfigDict(
      {**model.config.to_dict(), 'vocab_size': tokenizer.vocab_size}), length=8, seed=1)
  prompts = ['ab', 'hello there']
  kwargs = dict(max_new_tokens=16, temperature=1.0, top_k=20)
  first = sampling.complete(model, params, tokenizer, prompts, seed=3, **kwargs)
  again = sampling.complete(model, params, tokenizer, prompts, seed=3, **kwargs)
  other = sampling.complete(model, params, tokenizer, prompts, seed=4, **kwargs)
  # 16 tokens drawn from 20 each: another seed giving a row's text again is negligible.
  assert first == again and all(a != b for a, b in zip(first, other, strict=True))
  # Each text is the decoding of exactly the tokens that generate samples for its row
  # (bos + prompt in, the eos left out), for the same seed.
  ids = [[tokenizer.bos_id, *tokenizer.encode(prompt)] for prompt in prompts]
  prompts_bp, lengths_b = sampling.pad_prompts(ids, tokenizer.pad_id)
  new_bn, num_new_b = sampling.generate(  # Row i's key: seed + i's, as complete gives it.
      params, jnp.asarray(prompts_bp), jnp.asarray(lengths_b),
      jax.vmap(jax.random.key)(3 + jnp.arange(len(prompts))), jnp.asarray([tokenizer.eos_id]),
      model=model,
      cache_length=prompts_bp.shape[1] + kwargs['max_new_tokens'], pad_id=tokenizer.pad_id,
      **kwargs)
  for text, row, count in zip(first, np.asarray(new_bn), np.asarray(num_new_b), strict=True):
    tokens = [int(token) for token in row[:count] if token != tokenizer.eos_id]
    assert len(tokens) >= 8 and text == tokenizer.decode(tokens)


@pytest.mark.parametrize('options', [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2),
                                     dict(max_new_tokens=0)])
def test_bad_sampling_options_are_refused_by_name(model_and_params, options):
  model, params = model_and_params
  prompts_bp, lengths_b = sampling.pad_prompts([[1, 5]], pad_id=0, multiple=8)
  options = {'max_new_tokens': 4, **options}
  with pytest.raises(ValueError, match=next(iter(options.keys() - {'max_new_tokens'}),
                                            'max_new_tokens')):
    sampling.generate(params, jnp.asarray(prompts_bp), jnp.asarray(lengths_b),
                      jax.random.key(0), jnp.asarray([-1]), model=model, cache_length=16,
                      **options)


def test_weights_cast_once_give_the_same_logits_as_flax_casting_each_call():
  # generate casts Dense/Embed weights to the compute dtype before its loop; this holds
  # only while the model would cast exactly those weights itself (Mamba's a_log, d and
  # the norms stay float32), so any path that used one in float32 would show here.
  model, params = init_model(small_model_config(dtype='bfloat16', layer_pattern='mamba,attention'))
  tokens = jax.random.randint(jax.random.key(2), (2, 8), 3, 97)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  # Off their initial values (ones, log 1..N), which bf16 would hold exactly.
  params = jax.jit(lambda params: jax.tree.map(  # One compilation, not one per leaf shape.
      lambda p, k: p + 0.01 * jax.random.normal(k, p.shape), params,
      jax.tree.unflatten(jax.tree.structure(params), jax.random.split(
          jax.random.key(3), len(jax.tree.leaves(params))))))(params)
  cast = sampling.cast_weights(params, jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16),
                                                            jnp.dtype(jnp.float32)}
  segments = jnp.ones_like(tokens)
  apply = jit_apply(model)
  want = apply({'params': params}, tokens, segments, positions)
  got = apply({'params': cast}, tokens, segments, positions)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  cache = sampling.init_cache(model, batch_size=2, cache_length=8)
  decode = lambda p: apply({'params': p, 'cache': cache}, tokens, segments, positions,
                           decode=True)[0]
  np.testing.assert_array_equal(np.asarray(decode(cast)), np.asarray(decode(params)))
