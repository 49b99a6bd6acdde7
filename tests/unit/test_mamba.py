"""Mamba and hybrid models: packing, causality, cached decoding and generation, the layer
pattern and the FLOPs count. Training them through the loop is in
tests/integration/test_mamba_training.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import models
from lm import flops
from lm.models import decoder

from helpers import init_model as init, jit_apply, small_model_config


@pytest.mark.parametrize('pattern', ['mamba', 'mamba,attention'])
def test_packed_documents_give_the_same_logits_as_each_document_alone(pattern):
  model, params = init(small_model_config(layer_pattern=pattern, mamba_scan='chunked'))
  apply = jit_apply(model)
  lengths = (5, 9, 4)
  documents = [jax.random.randint(jax.random.key(i), (1, n), 0, 97) for i, n in enumerate(lengths)]
  packed = jnp.concatenate(documents, axis=1)
  segment_ids = jnp.concatenate([jnp.full((1, n), i + 1) for i, n in enumerate(lengths)], 1)
  positions = jnp.concatenate([jnp.arange(n) for n in lengths])[None]
  packed_logits = apply({'params': params}, packed, segment_ids, positions)
  # Each document alone, all in one call (a single compilation): a row each, zeros after
  # it, which a causal model does not let reach its logits.
  width = max(lengths)
  alone = apply({'params': params},
                jnp.concatenate([jnp.pad(d, ((0, 0), (0, width - d.shape[1]))) for d in documents]),
                jnp.ones((len(lengths), width), jnp.int32),
                jnp.broadcast_to(jnp.arange(width), (len(lengths), width)))
  start = 0
  for row, document in enumerate(documents):
    length = document.shape[1]
    np.testing.assert_allclose(packed_logits[:, start:start + length], alone[row:row + 1, :length],
                               rtol=1e-5, atol=1e-5)
    start += length


def test_mamba_is_causal_and_both_scans_agree_inside_the_model():
  model, params = init(small_model_config(layer_pattern='mamba', mamba_scan='reference'))
  chunked = models.build(small_model_config(layer_pattern='mamba', mamba_scan='chunked'))
  tokens = jax.random.randint(jax.random.key(9), (2, 20), 0, 97)
  changed = tokens.at[:, 12].set((tokens[:, 12] + 1) % 97)
  ones, positions = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(20), (2, 20))
  apply = jit_apply(model)
  logits = apply({'params': params}, tokens, ones, positions)
  logits_changed = apply({'params': params}, changed, ones, positions)
  np.testing.assert_allclose(logits[:, :12], logits_changed[:, :12], rtol=1e-6, atol=1e-6)
  assert not np.allclose(logits[:, 12:], logits_changed[:, 12:], atol=1e-3)
  np.testing.assert_allclose(jit_apply(chunked)({'params': params}, tokens, ones, positions),
                             logits, rtol=1e-5, atol=1e-5)


def test_layer_pattern_repeats_over_the_layers():
  config = small_model_config(num_layers=5, layer_pattern='mamba, mamba, attention')
  assert decoder.layer_kinds(config) == ['mamba', 'mamba', 'attention', 'mamba', 'mamba']
  _, params = init(config)
  assert 'mixer' in params['layer_0'] and 'attention' in params['layer_2']


def test_flops_count_covers_every_mamba_matmul_weight():
  config = small_model_config(layer_pattern='mamba', num_layers=1, tie_embeddings=True)
  _, params = init(config)
  layer = params['layer_0']['mixer']
  weights = sum(layer[name]['kernel'].size for name in ('in_proj', 'x_proj', 'dt_proj', 'out_proj'))
  inner, state = 2 * config.embed_dim, config.mamba_state_dim
  scan_and_conv = 18 * inner * state + 6 * config.mamba_conv_width * inner
  assert flops.flops_per_token(config, 16) == (
      6 * weights + scan_and_conv + 6 * config.embed_dim * config.vocab_size)


@pytest.mark.parametrize('pattern', ['mamba', 'mamba,attention'])
def test_cached_decoding_gives_the_logits_of_a_full_forward_pass_for_ragged_prompts(pattern):
  from lm import sampling
  model, params = init(small_model_config(layer_pattern=pattern, vocab_size=61))
  apply = jit_apply(model)
  rng = np.random.default_rng(0)
  lengths = [3, 8, 5]
  continuation = rng.integers(3, 61, (3, 5))
  prompts, lengths_b = sampling.pad_prompts(
      [list(rng.integers(3, 61, n)) for n in lengths], pad_id=0, multiple=8)
  cache = sampling.init_cache(model, batch_size=3, cache_length=16)
  segment_ids = (np.arange(8)[None] < lengths_b[:, None]).astype(np.int32)
  pieces = []
  calls = [(prompts, segment_ids, np.broadcast_to(np.arange(8), (3, 8)))]
  start = 0
  for size in (1, 2, 2):
    calls.append((continuation[:, start:start + size], np.ones((3, size), np.int32),
                  lengths_b[:, None] + start + np.arange(size)[None]))
    start += size
  for tokens, segments, positions in calls:
    logits, variables = apply({'params': params, 'cache': cache}, jnp.asarray(tokens),
                              jnp.asarray(segments), jnp.asarray(positions), decode=True)
    cache = variables['cache']
    pieces.append(logits)
  # The full forward of every row over one fixed-length buffer (a single compilation):
  # causal, so the zeros after a row's ids do not reach their logits.
  rows = [list(prompts[row, :length]) + list(continuation[row])
          for row, length in enumerate(lengths)]
  width = max(map(len, rows))
  full = apply({'params': params}, jnp.asarray([row + [0] * (width - len(row)) for row in rows]),
               jnp.ones((len(rows), width), jnp.int32),
               jnp.broadcast_to(jnp.arange(width), (len(rows), width)))
  for row, length in enumerate(lengths):
    want = full[row, :len(rows[row])]
    got = np.concatenate([pieces[0][row, :length]] + [p[row] for p in pieces[1:]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_greedy_generation_of_a_hybrid_matches_full_recomputation():
  from lm import sampling
  model, params = init(small_model_config(layer_pattern='mamba,attention', vocab_size=61))
  prompts = [[1, 5, 9], [1, 7, 7, 7, 30, 2, 4]]
  prompts_bp, lengths_b = sampling.pad_prompts(prompts, pad_id=0, multiple=8)
  new_bn, _ = sampling.generate(params, jnp.asarray(prompts_bp), jnp.asarray(lengths_b),
                                jax.random.key(0), jnp.asarray([-1]), model=model,
                                max_new_tokens=6, cache_length=16)
  # One fixed-length buffer (a single compilation): both layer kinds are causal, so the
  # zeros after the ids do not reach the last id's logits.
  forward = jax.jit(lambda tokens: model.apply({'params': params}, tokens[None],
                                               jnp.ones_like(tokens)[None],
                                               jnp.arange(tokens.size)[None])[0])
  for row, prompt in enumerate(prompts):
    ids = list(prompt)
    for _ in range(6):
      logits = forward(jnp.asarray(ids + [0] * (16 - len(ids))))
      ids.append(int(jnp.argmax(logits[len(ids) - 1])))
    assert np.asarray(new_bn[row]).tolist() == ids[len(prompt):]
