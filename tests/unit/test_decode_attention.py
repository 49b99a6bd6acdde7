"""The Pallas decode-attention kernel against the reference (interpret mode on CPU), an
awkward shape of each dtype, and lowered for its GPU with jax.export. The rest of the grid,
and the kernel inside the model's cached decoding, are in
tests/integration/test_decode_attention_grid.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import api, gpu, reference

import backend
import lowering


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


def kernel_cases(cases, dtypes):
  """(case..., dtype, tolerance) for each case and dtype, with the ids of the grid."""
  return [pytest.param(*case, dtype, tolerance,
                       id=f'{jnp.dtype(dtype).name}-{tolerance}-' + '-'.join(map(str, case)))
          for dtype, tolerance in dtypes for case in cases]


# (num_heads, num_kv_heads, head_dim, slots, block_s): ragged starts below, among them the
# first slot, one in the middle of a block and the last slot. The rest of the grid is in
# the integration tier.
@pytest.mark.parametrize('num_heads,num_kv_heads,head_dim,slots,block_s,dtype,tolerance',
                         kernel_cases([(8, 2, 64, 77, 16)], [(jnp.bfloat16, 1e-2)]) +
                         kernel_cases([(32, 1, 64, 40, 16)], [(jnp.float32, 1e-5)]))
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


@pytest.mark.parametrize('window', [10])  # Across block_s=16; the others: integration.
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
