"""The rest of the decode-attention grid of tests/unit/test_decode_attention.py (every
shape, dtype and window there was, less the few the unit tier runs): the Pallas kernel
against the reference in interpret mode on CPU; and the kernel inside the model's cached
decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import models, sampling
from pallas_kernels.decode_attention import api

import backend
from helpers import init_model, jit_apply, small_model_config
import test_decode_attention as unit


# The helpers below are those of tests/unit/test_decode_attention.py.


CASES = [
    # (num_heads, num_kv_heads, head_dim, slots, block_s): ragged starts below, among
    # them the first slot, one in the middle of a block and the last slot.
    (4, 4, 64, 100, 32),
    (8, 2, 64, 77, 16),
    (8, 1, 128, 130, 64),
    (32, 1, 64, 40, 16),  # A group of 32 queries: more than the 16 rows a dot needs.
    (2, 2, 128, 300, 128),
]


# The unit tier runs these.
UNIT_CASES = [((8, 2, 64, 77, 16), jnp.bfloat16), ((32, 1, 64, 40, 16), jnp.float32)]


@pytest.mark.parametrize('num_heads,num_kv_heads,head_dim,slots,block_s,dtype,tolerance', [
    pytest.param(*case, dtype, tolerance,
                 id=f'{jnp.dtype(dtype).name}-{tolerance}-' + '-'.join(map(str, case)))
    for dtype, tolerance in [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)] for case in CASES
    if (case, dtype) not in UNIT_CASES])
def test_kernel_matches_reference(num_heads, num_kv_heads, head_dim, slots, block_s, dtype,
                                  tolerance):
  unit.test_kernel_matches_reference(
      num_heads, num_kv_heads, head_dim, slots, block_s, dtype, tolerance)


@pytest.mark.parametrize('window', [1, 40, 200])  # Below and above block_s=16 (unit: 10).
def test_kernel_with_a_sliding_window_matches_reference(window):
  unit.test_kernel_with_a_sliding_window_matches_reference(window)


def test_pallas_decoding_in_the_model_matches_xla_decoding(monkeypatch):
  """attention='pallas' sends one-token steps through the kernel (here interpreted):
  greedy generation and each step's logits equal those of the einsum path."""
  monkeypatch.setattr(api, 'decode_attention', functools.partial(
      api.decode_attention, implementation='gpu', interpret=backend.INTERPRET))
  # head_dim 16: the smallest the kernel takes (it would fall back to the reference).
  xla_model, params = init_model(small_model_config(vocab_size=61, head_dim=16), length=8)
  pallas_model = models.build(small_model_config(vocab_size=61, head_dim=16,
                                                 attention='pallas'))
  prompts_bt, lengths_b = sampling.pad_prompts([[1, 5, 9], [1, 7, 7, 7, 30, 2, 4], [1]],
                                               pad_id=0, multiple=8)
  run = lambda model: sampling.generate(
      params, jnp.asarray(prompts_bt), jnp.asarray(lengths_b), jax.random.key(0),
      jnp.asarray([-1]), model=model, max_new_tokens=12, cache_length=24)
  np.testing.assert_array_equal(run(pallas_model)[0], run(xla_model)[0])

  def step_logits(model):
    cache = sampling.init_cache(model, batch_size=3, cache_length=24)
    segment_ids = (np.arange(8)[None] < lengths_b[:, None]).astype(np.int32)
    positions = jnp.broadcast_to(jnp.arange(8), (3, 8))
    apply = jit_apply(model)
    _, variables = apply({'params': params, 'cache': cache}, jnp.asarray(prompts_bt),
                         jnp.asarray(segment_ids), positions, decode=True)
    token = jnp.asarray([[11], [12], [13]])
    logits, _ = apply({'params': params, 'cache': variables['cache']}, token,
                      jnp.ones_like(token), jnp.asarray(lengths_b)[:, None], decode=True)
    return logits

  np.testing.assert_allclose(step_logits(pallas_model), step_logits(xla_model), rtol=1e-5,
                             atol=1e-5)
