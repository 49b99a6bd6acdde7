"""The int8 decoding cache (config.model.kv_cache_dtype='int8', lm/models/transformer.py):
each stored key and value within half its scale of the float one, decoding's logits
close to the float cache's, and the cache's bytes as the formula says."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm import sampling
from lm.models import transformer

from helpers import init_model, small_model_config


def test_each_vector_is_within_half_its_scale_and_zero_stays_zero():
  x = jax.random.normal(jax.random.key(0), (3, 5, 2, 16)) * jnp.linspace(0.01, 30, 16)
  x = x.at[0, 0, 0].set(0.0)
  quantized, scale = transformer.quantize_int8(x)
  assert quantized.dtype == jnp.int8 and scale.shape == (3, 5, 2)
  np.testing.assert_allclose(scale, np.abs(np.asarray(x)).max(-1) / 127, rtol=1e-6)
  error = np.abs(np.asarray(x) - np.asarray(quantized, np.float32) * np.asarray(scale)[..., None])
  assert (error <= np.asarray(scale)[..., None] * (0.5 + 1e-5) + 1e-12).all()
  assert (np.asarray(quantized[0, 0, 0]) == 0).all() and float(scale[0, 0, 0]) == 0.0
  assert np.abs(np.asarray(quantized)).max() == 127


def decode(config, params, prompts, steps: int):
  """Logits after the prompt and after each greedy token: [steps + 1, B, V]."""
  model = init_model(config)[0]
  prefill = jax.jit(functools.partial(sampling.prefill, model, cache_length=32))
  step = jax.jit(functools.partial(sampling.decode_step, model))
  lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
  logits, cache = prefill(params, prompts, lengths)
  history = [logits]
  for index in range(steps):
    token = jnp.argmax(history[-1], axis=-1).astype(jnp.int32)
    logits, cache = step(params, cache, token, lengths + index)
    history.append(logits)
  return np.asarray(jnp.stack(history)), cache


def test_decoding_through_an_int8_cache_stays_near_the_float_cache():
  config = small_model_config()
  _, params = init_model(config)
  prompts = jax.random.randint(jax.random.key(1), (2, 8), 0, config.vocab_size)
  exact, float_cache = decode(config, params, prompts, steps=6)
  int8, int8_cache = decode(small_model_config(kv_cache_dtype='int8'), params, prompts, steps=6)
  # Within 2% of the logits' range: a float cache's rounding is far below, a wrong scale
  # or slot far above.
  assert np.abs(int8 - exact).max() < 0.02 * np.abs(exact).max()
  assert np.abs(int8 - exact).max() > 0  # Not the float path.
  layer = jax.tree.leaves_with_path(int8_cache)
  assert any(leaf.dtype == jnp.int8 for _, leaf in layer)
  # Keys and values: 1 byte each instead of 4, plus a float32 scale per head_dim of them.
  kv_bytes = lambda cache, names: sum(leaf.nbytes for path, leaf in
                                      jax.tree.leaves_with_path(cache)
                                      if any(name in jax.tree_util.keystr(path) for name in names))
  float_bytes = kv_bytes(float_cache, ('cached_key', 'cached_value'))
  int8_bytes = kv_bytes(int8_cache, ('cached_key', 'cached_value'))  # Scales included.
  assert int8_bytes == float_bytes * (1 + 4 / config.head_dim) / 4
