"""Paged attention: the reference against attention written out in float64 over each row's
pages laid end to end, and the Pallas kernels (Triton for GPUs, Mosaic for TPUs) against
the reference (interpret mode on CPU) on a few awkward shapes; the rest of the kernel
grids and their lowering for GPU and TPU are in
tests/integration/test_paged_attention_grid.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import api, gpu, reference, tpu

import backend

# Where each kernel runs in these tests: compiled on its own hardware, else interpreted.
GPU_ON_THIS_BACKEND = backend.INTERPRET or jax.default_backend() == 'gpu'
TPU_ON_THIS_BACKEND = backend.INTERPRET or jax.default_backend() == 'tpu'


def paged_inputs(seed, lengths, *, num_heads, num_kv_heads, head_dim, page_size,
                 pages_per_row, dtype=jnp.float32, spare_pages=3):
  """q [B, N, H], k_pages and v_pages [P, S, K, H], page_table [B, M], lengths [B].

  Each row's pages are distinct pages of the pool in shuffled order. Table entries past a
  row's length name page 0, and page 0, the spare pages and each row's slots past its
  length hold NaN: attention must never see them."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths, np.int32)
  batch = len(lengths)
  used = [math.ceil(length / page_size) for length in lengths]
  num_pages = 1 + sum(used) + spare_pages
  order = rng.permutation(np.arange(1, num_pages))
  page_table = np.zeros((batch, pages_per_row), np.int32)
  shape = (num_pages, page_size, num_kv_heads, head_dim)
  k_pages, v_pages = rng.standard_normal(shape), rng.standard_normal(shape)
  seen = np.zeros(shape[:2], bool)  # [P, S]: slots inside some row's length.
  taken = 0
  for row, length in enumerate(lengths):
    page_table[row, :used[row]] = order[taken:taken + used[row]]
    taken += used[row]
    for slot in range(length):
      seen[page_table[row, slot // page_size], slot % page_size] = True
  k_pages[~seen], v_pages[~seen] = np.nan, np.nan
  q = rng.standard_normal((batch, num_heads, head_dim))
  return (jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype),
          jnp.asarray(page_table), jnp.asarray(lengths))


def dense_attention(q, k_pages, v_pages, page_table, lengths, *, window=None):
  """float64 numpy: each row's slots gathered page by page into one contiguous K and V,
  cut to its length (and window), then softmax(q k^T / sqrt(H)) v per query head."""
  q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
  batch, num_heads, head_dim = q.shape
  page_size, num_kv_heads = k_pages.shape[1:3]
  out = np.zeros_like(q)
  for row in range(batch):
    length = int(lengths[row])
    if length == 0:
      continue  # An idle row: zeros.
    pages = [int(page) for page in page_table[row, :math.ceil(length / page_size)]]
    keys = np.concatenate([k_pages[page] for page in pages])[:length]  # [length, K, H]
    values = np.concatenate([v_pages[page] for page in pages])[:length]
    if window is not None:
      keys, values = keys[-window:], values[-window:]
    for head in range(num_heads):
      kv_head = head // (num_heads // num_kv_heads)
      logits = keys[:, kv_head] @ q[row, head] / math.sqrt(head_dim)
      weights = np.exp(logits - logits.max())
      out[row, head] = weights @ values[:, kv_head] / weights.sum()
  return out


def relative_error(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return np.max(np.abs(got - want)) / np.max(np.abs(want))


# (num_heads, num_kv_heads, head_dim, page_size, pages_per_row, lengths, window): lengths
# of one slot, a page exactly, one past a page, a full table, and idle rows.
REFERENCE_CASES = [
    (4, 4, 16, 4, 5, [1, 4, 5, 20, 0, 13], None),
    (8, 2, 16, 8, 4, [0, 32, 9, 16, 1], None),
    (12, 3, 8, 4, 6, [24, 7, 1, 12], None),  # A group of 4, head dim 8.
    (6, 1, 16, 16, 3, [48, 17, 3], None),  # Multi-query: all heads read one kv head.
    (4, 2, 16, 4, 6, [1, 4, 5, 11, 24, 0], 1),  # Only the token itself.
    (4, 2, 16, 4, 6, [1, 4, 5, 11, 24, 0], 6),  # Across a page boundary.
    (8, 4, 16, 8, 5, [40, 8, 33, 2], 16),  # A window of whole pages.
    (4, 1, 16, 4, 3, [12, 3], 100),  # Longer than any row.
]


@pytest.mark.parametrize('num_heads,num_kv_heads,head_dim,page_size,pages_per_row,lengths,'
                         'window', REFERENCE_CASES)
def test_reference_matches_dense_attention_over_each_rows_pages(
    num_heads, num_kv_heads, head_dim, page_size, pages_per_row, lengths, window):
  inputs = paged_inputs(len(lengths) * 100 + page_size, lengths, num_heads=num_heads,
                        num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
                        pages_per_row=pages_per_row)
  got = reference.paged_attention(*inputs, window=window)
  want = dense_attention(*inputs, window=window)
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_reference_gives_zeros_for_idle_rows_and_uses_sm_scale():
  q, k_pages, v_pages, page_table, lengths = paged_inputs(
      7, [0, 9, 0], num_heads=2, num_kv_heads=1, head_dim=16, page_size=4, pages_per_row=3)
  got = reference.paged_attention(q, k_pages, v_pages, page_table, lengths, sm_scale=0.5)
  np.testing.assert_array_equal(got[0], 0)
  np.testing.assert_array_equal(got[2], 0)
  # sm_scale=0.5 is the default scale for a query twice as large (H=16: 1/4).
  want = reference.paged_attention(2 * q, k_pages, v_pages, page_table, lengths)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_reference_does_not_depend_on_the_page_order_in_the_pool():
  """Moving a row's pages elsewhere in the pool and its table with them changes nothing."""
  q, k_pages, v_pages, page_table, lengths = paged_inputs(
      11, [7, 12], num_heads=4, num_kv_heads=2, head_dim=16, page_size=4, pages_per_row=3)
  moved = np.random.default_rng(0).permutation(k_pages.shape[0])  # New place of page p.
  where_from = np.argsort(moved)
  got = reference.paged_attention(q, k_pages[where_from], v_pages[where_from],
                                  jnp.asarray(moved[np.asarray(page_table)]), lengths)
  want = reference.paged_attention(q, k_pages, v_pages, page_table, lengths)
  np.testing.assert_array_equal(got, want)


def assert_kernel_matches_reference(seed, lengths, *, num_heads, num_kv_heads, head_dim,
                                    page_size, pages_per_row, dtype, tolerance, window=None,
                                    block_sizes=None, implementation='gpu'):
  inputs = paged_inputs(seed, lengths, num_heads=num_heads, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, page_size=page_size, pages_per_row=pages_per_row,
                        dtype=dtype)
  want = reference.paged_attention(*inputs, window=window)
  got = api.paged_attention(*inputs, window=window, implementation=implementation,
                            block_sizes=block_sizes, interpret=backend.INTERPRET)
  assert got.dtype == dtype and got.shape == want.shape
  assert np.isfinite(np.asarray(got, np.float32)).all()
  for row in np.flatnonzero(np.asarray(inputs[-1]) == 0):
    np.testing.assert_array_equal(np.asarray(got[row], np.float32), 0, err_msg=f'idle {row=}')
  error = relative_error(got, want)
  assert error < backend.matmul_tolerance(tolerance), f'out: relative error {error:.2e}'


# (num_heads, num_kv_heads, head_dim, page_size, pages_per_row, lengths, window): lengths
# of one slot, a page exactly, one past a page, a full table and an idle row. The rest of
# the grid is in the integration tier.
KERNEL_CASES = [
    pytest.param(8, 2, 32, 16, 4, [1, 16, 17, 64, 0], None, jnp.bfloat16, 1e-2, id='bf16-gqa'),
    pytest.param(4, 4, 16, 16, 5, [0, 70, 33, 16], 20, jnp.float32, 1e-5, id='f32-window'),
]


@pytest.mark.skipif(not GPU_ON_THIS_BACKEND, reason='the GPU kernel runs on a GPU or in the '
                    'interpreter')
@pytest.mark.parametrize('num_heads,num_kv_heads,head_dim,page_size,pages_per_row,lengths,'
                         'window,dtype,tolerance', KERNEL_CASES)
def test_kernel_matches_reference(num_heads, num_kv_heads, head_dim, page_size,
                                  pages_per_row, lengths, window, dtype, tolerance):
  assert_kernel_matches_reference(
      len(lengths) + head_dim, lengths, num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, page_size=page_size, pages_per_row=pages_per_row, dtype=dtype,
      tolerance=tolerance, window=window)


# The TPU kernel's heads are whole 128-lane tiles.
TPU_CASES = [
    pytest.param(8, 2, 128, 16, 4, [1, 16, 17, 64, 0], None, jnp.bfloat16, 1e-2, id='bf16-gqa'),
    pytest.param(3, 1, 128, 32, 3, [0, 70, 33, 96], 40, jnp.float32, 1e-5, id='f32-window'),
]


@pytest.mark.skipif(not TPU_ON_THIS_BACKEND, reason='the TPU kernel runs on a TPU or in the '
                    'interpreter')
@pytest.mark.parametrize('num_heads,num_kv_heads,head_dim,page_size,pages_per_row,lengths,'
                         'window,dtype,tolerance', TPU_CASES)
def test_tpu_kernel_matches_reference(num_heads, num_kv_heads, head_dim, page_size,
                                      pages_per_row, lengths, window, dtype, tolerance):
  assert_kernel_matches_reference(
      len(lengths) + page_size, lengths, num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, page_size=page_size, pages_per_row=pages_per_row, dtype=dtype,
      tolerance=tolerance, window=window, implementation='tpu')


def small_inputs(num_heads=4, num_kv_heads=2, page_size=16):
  return paged_inputs(3, [5, 0], num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=16, page_size=page_size, pages_per_row=2)


@pytest.mark.parametrize('window', [0, -3, 2.5, True])
def test_window_must_be_a_positive_int(window):
  with pytest.raises(ValueError, match='must be a positive int or None'):
    api.paged_attention(*small_inputs(), window=window)


def test_query_heads_must_be_a_multiple_of_kv_heads():
  q, k_pages, v_pages, page_table, lengths = small_inputs(num_heads=4, num_kv_heads=2)
  with pytest.raises(ValueError, match='query heads 3 are not a multiple of kv heads 2'):
    api.paged_attention(jnp.zeros((2, 3, 16)), k_pages, v_pages, page_table, lengths)


def test_mismatched_shapes_are_named():
  q, k_pages, v_pages, page_table, lengths = small_inputs()
  with pytest.raises(ValueError, match='must both be'):
    api.paged_attention(q, k_pages, v_pages[:, :8], page_table, lengths)
  with pytest.raises(ValueError, match='page_table .* must be'):
    api.paged_attention(q, k_pages, v_pages, page_table[:1], lengths)
  with pytest.raises(ValueError, match='lengths .* must be'):
    api.paged_attention(q, k_pages, v_pages, page_table, lengths[:1])
  with pytest.raises(ValueError, match="implementation='cuda' is not one of None"):
    api.paged_attention(q, k_pages, v_pages, page_table, lengths, implementation='cuda')


def test_block_sizes_are_checked():
  with pytest.raises(ValueError, match='num_warps=3'):
    gpu.BlockSizes(num_warps=3)
  with pytest.raises(ValueError, match='num_stages=0'):
    gpu.BlockSizes(num_stages=0)


@pytest.mark.parametrize('page_size,head_dim,num_heads,reason', [
    (8, 16, 4, 'page_size=8'), (24, 16, 4, 'page_size=24'), (16, 48, 4, 'head_dim=48'),
    (16, 16, 6, 'query heads per kv head (3)')])
def test_shapes_the_kernel_cannot_take_are_named(page_size, head_dim, num_heads, reason):
  q = jax.ShapeDtypeStruct((1, num_heads, head_dim), jnp.float32)
  k_pages = jax.ShapeDtypeStruct((4, page_size, 2, head_dim), jnp.float32)
  assert reason in gpu.unsupported(q, k_pages)


@pytest.mark.parametrize('page_size,head_dim,reason', [
    (8, 128, 'page_size=8'), (24, 128, 'page_size=24'), (16, 64, 'head_dim=64')])
def test_shapes_the_tpu_kernel_cannot_take_are_named(page_size, head_dim, reason):
  q = jax.ShapeDtypeStruct((1, 4, head_dim), jnp.float32)
  k_pages = jax.ShapeDtypeStruct((4, page_size, 2, head_dim), jnp.float32)
  assert reason in tpu.unsupported(q, k_pages)
  assert tpu.unsupported(jax.ShapeDtypeStruct((1, 6, 256), jnp.float32),
                         jax.ShapeDtypeStruct((4, 32, 3, 256), jnp.float32)) is None


def test_unsupported_shapes_fall_back_to_the_reference_with_a_log_line(caplog):
  inputs = small_inputs(page_size=8)
  with caplog.at_level('WARNING'):
    got = api.paged_attention(*inputs, implementation='gpu', interpret=backend.INTERPRET)
  assert 'falling back to the reference' in caplog.text and 'page_size=8' in caplog.text
  np.testing.assert_array_equal(got, reference.paged_attention(*inputs))


@pytest.mark.skipif(backend.ON_DEVICE, reason='checks the CPU dispatch')
def test_on_cpu_the_dispatch_picks_the_reference():
  inputs = small_inputs()
  np.testing.assert_array_equal(api.paged_attention(*inputs, window=3),
                                reference.paged_attention(*inputs, window=3))
