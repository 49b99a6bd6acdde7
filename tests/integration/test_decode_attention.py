"""The Pallas decode-attention kernel against the reference (interpret mode on CPU),
lowered for its GPU with jax.export, and inside the model's cached decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import models, sampling
from pallas_kernels.decode_attention import api, gpu, reference

import backend
import lowering
from helpers import init_model, jit_apply, small_model_config


def inputs(seed, batch, slots, num_heads, num_kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 6)
  normal = lambda key, *shape: jax.random.normal(key, shape, dtype)
  return (normal(keys[0], batch, num_heads, head_dim),
          normal(keys[1], batch, num_kv_heads, head_dim),
          normal(keys[2], batch, num_kv_heads, head_dim),
          normal(keys[3], batch, slots, num_kv_heads, head_dim),
          normal(keys[4], batch, slots, num_kv_heads, head_dim))


def relative_error(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return np.max(np.abs(got - want)) / np.max(np.abs(want))


CASES = [
    # (num_heads, num_kv_heads, head_dim, slots, block_s): ragged starts below, among
    # them the first slot, one in the middle of a block and the last slot.
    (4, 4, 64, 100, 32),
    (8, 2, 64, 77, 16),
    (8, 1, 128, 130, 64),
    (32, 1, 64, 40, 16),  # A group of 32 queries: more than the 16 rows a dot needs.
    (2, 2, 128, 300, 128),
]


@pytest.mark.parametrize('num_heads,num_kv_heads,head_dim,slots,block_s', CASES)
@pytest.mark.parametrize('dtype,tolerance', [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_kernel_matches_reference(num_heads, num_kv_heads, head_dim, slots, block_s, dtype,
                                  tolerance):
  q, k, v, k_cache, v_cache = inputs(slots, 4, slots, num_heads, num_kv_heads, head_dim, dtype)
  start = jnp.asarray([0, slots // 2 + 3, block_s, slots - 1], jnp.int32)
  want = reference.decode_attention(q, k, v, k_cache, v_cache, start)
  got = api.decode_attention(q, k, v, k_cache, v_cache, start, implementation='gpu',
                             block_sizes=gpu.BlockSizes(block_s=block_s),
                             interpret=backend.INTERPRET)
  error = relative_error(got[0], want[0])
  assert error < backend.matmul_tolerance(tolerance), f'out: relative error {error:.2e}'
  for name, got_cache, want_cache in zip(('keys', 'values'), got[1:], want[1:]):
    np.testing.assert_array_equal(got_cache, want_cache, err_msg=name)


@pytest.mark.parametrize('window', [1, 10, 40, 200])  # Below, across and above block_s=16.
def test_kernel_with_a_sliding_window_matches_reference(window):
  slots, block_s = 77, 16
  q, k, v, k_cache, v_cache = inputs(window, 4, slots, 8, 2, 64, jnp.float32)
  start = jnp.asarray([0, slots // 2 + 3, block_s, slots - 1], jnp.int32)
  want = reference.decode_attention(q, k, v, k_cache, v_cache, start, window=window)
  got = api.decode_attention(q, k, v, k_cache, v_cache, start, window=window,
                             implementation='gpu', block_sizes=gpu.BlockSizes(block_s=block_s),
                             interpret=backend.INTERPRET)
  error = relative_error(got[0], want[0])
  assert error < backend.matmul_tolerance(1e-5), f'out: relative error {error:.2e}'
  for name, got_cache, want_cache in zip(('keys', 'values'), got[1:], want[1:]):
    np.testing.assert_array_equal(got_cache, want_cache, err_msg=name)


def test_window_must_be_a_positive_int():
  q, k, v, k_cache, v_cache = inputs(4, 1, 8, 2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match='must be a positive int or None'):
    api.decode_attention(q, k, v, k_cache, v_cache, jnp.asarray([3]), window=0)


def test_reference_attends_to_the_filled_slots_and_the_new_token_only():
  """The reference against attention written out for one row: softmax over slots
  0 .. start, where slot start holds the new token; later slots do not matter."""
  q, k, v, k_cache, v_cache = inputs(1, 1, 12, 2, 1, 16, jnp.float32)
  start = 5
  out, new_k_cache, _ = reference.decode_attention(q, k, v, k_cache, v_cache,
                                                   jnp.asarray([start]))
  keys = np.concatenate([k_cache[0, :start, 0], k[0]])  # [start + 1, H]
  values = np.concatenate([v_cache[0, :start, 0], v[0]])
  for head in range(2):
    logits = keys @ np.asarray(q[0, head]) / 4.0
    weights = np.exp(logits - logits.max())
    np.testing.assert_allclose(out[0, head], weights @ values / weights.sum(), rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_array_equal(new_k_cache[0, start], k[0])
  np.testing.assert_array_equal(new_k_cache[0, start + 1:], k_cache[0, start + 1:])


def test_reference_window_attends_to_the_last_window_slots_only():
  """With a window of 3 the new token at slot 5 attends to slots 3, 4 and itself, written
  out slot by slot."""
  q, k, v, k_cache, v_cache = inputs(5, 1, 12, 2, 1, 16, jnp.float32)
  start, window = 5, 3
  out, _, _ = reference.decode_attention(q, k, v, k_cache, v_cache, jnp.asarray([start]),
                                         window=window)
  keys = [np.asarray(k_cache[0, s, 0]) for s in range(start - window + 1, start)] + [k[0, 0]]
  values = [np.asarray(v_cache[0, s, 0]) for s in range(start - window + 1, start)] + [v[0, 0]]
  for head in range(2):
    logits = np.array([key @ np.asarray(q[0, head]) for key in keys]) / 4.0
    weights = np.exp(logits - logits.max())
    want = sum(w * value for w, value in zip(weights, values)) / weights.sum()
    np.testing.assert_allclose(out[0, head], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('head_dim,num_heads,num_kv_heads,window',
                         [(64, 12, 12, None), (128, 16, 2, None), (128, 16, 2, 100)])
def test_kernel_lowers_for_its_gpu(head_dim, num_heads, num_kv_heads, window):
  """The real Triton lowering: a kernel the GPU cannot compile fails here."""
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  args = (shape(2, num_heads, head_dim), shape(2, num_kv_heads, head_dim),
          shape(2, num_kv_heads, head_dim), shape(2, 528, num_kv_heads, head_dim),
          shape(2, 528, num_kv_heads, head_dim), shape(2, dtype=jnp.int32))
  step = functools.partial(api.decode_attention, window=window, implementation='gpu')
  assert lowering.count_kernel_calls('gpu', step, *args) == 1


def test_unsupported_shapes_fall_back_to_the_reference_with_a_log_line(caplog):
  q, k, v, k_cache, v_cache = inputs(2, 1, 8, 3, 1, 48, jnp.float32)  # head_dim 48
  start = jnp.asarray([4])
  with caplog.at_level('WARNING'):
    got = api.decode_attention(q, k, v, k_cache, v_cache, start, implementation='gpu',
                               interpret=backend.INTERPRET)
  assert 'falling back to the reference' in caplog.text and 'head_dim=48' in caplog.text
  want = reference.decode_attention(q, k, v, k_cache, v_cache, start)
  for got_part, want_part in zip(got, want):
    np.testing.assert_array_equal(got_part, want_part)


@pytest.mark.skipif(backend.ON_DEVICE, reason='checks the CPU dispatch')
def test_on_cpu_the_dispatch_picks_the_reference():
  q, k, v, k_cache, v_cache = inputs(3, 2, 8, 2, 2, 16, jnp.float32)
  start = jnp.asarray([0, 7])
  got = api.decode_attention(q, k, v, k_cache, v_cache, start)
  want = reference.decode_attention(q, k, v, k_cache, v_cache, start)
  for got_part, want_part in zip(got, want):
    np.testing.assert_array_equal(got_part, want_part)


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
