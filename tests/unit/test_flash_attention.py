"""The Pallas flash-attention kernels against the reference, in interpret mode on CPU,
and lowered for their real hardware with jax.export: for the GPU (Triton) and TPU kernels
an awkward shape, forward and gradients, with and without a window; the dispatch and its
refusals. The rest of the grids (bf16, other tilings), the Mosaic GPU kernels against the
reference and lowered, and the benchmark's smoke run are in
tests/integration/test_flash_attention_grid.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import api, gpu, mosaic_gpu, reference, tpu

import backend
import lowering

# Small blocks so short test sequences still span several of them.
SMALL_BLOCKS = {'gpu': gpu.BlockSizes.uniform(block_q=32, block_k=32),
                'tpu': tpu.BlockSizes(block_q=128, block_k=128)}
# The kernels each backend runs by default; the Mosaic GPU kernels (bf16 only) have their
# own tests.
KERNELS = backend.kernels(['gpu', 'tpu'])
MOSAIC_ON_THIS_BACKEND = backend.INTERPRET or jax.default_backend() == 'gpu'


def segment_ids(batch, length, layout):
  if layout == 'none':
    return None
  if layout == 'packed':  # Three documents of uneven lengths.
    cut1, cut2 = length // 3, length // 3 + length // 2
    row = np.concatenate([np.full(cut1, 1), np.full(cut2 - cut1, 2), np.full(length - cut2, 3)])
  else:  # 'padded': one document, then padding (segment 0).
    row = np.concatenate([np.full(length - 7, 1), np.zeros(7)])
  return jnp.asarray(np.tile(row, (batch, 1)), jnp.int32)


def inputs(seed, batch, length, num_heads, num_kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, num_heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, length, num_kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, length, num_kv_heads, head_dim), dtype)
  d_out = jax.random.normal(keys[3], (batch, length, num_heads, head_dim), dtype)
  return q, k, v, d_out


@functools.partial(jax.jit, static_argnames=('implementation', 'block_sizes', 'causal',
                                             'window'))
def kernel_values_and_grads(q, k, v, d_out, ids, *, implementation, block_sizes=None,
                            causal=True, window=None):
  """The kernel's output and its q, k, v gradients of sum(out * d_out), compiled as one
  program (run eagerly, each padding and slicing op compiles apart)."""
  attention = lambda q, k, v: api.flash_attention(
      q, k, v, ids, ids, causal=causal, window=window, implementation=implementation,
      interpret=backend.INTERPRET, block_sizes=block_sizes)
  out, vjp = jax.vjp(attention, q, k, v)
  return (out, *vjp(d_out))


@functools.partial(jax.jit, static_argnames=('causal', 'window'))
def reference_values_and_grads(q, k, v, d_out, ids, *, causal=True, window=None):
  """The same of the reference in float32 on the same values (gradients in the inputs'
  dtype); compiled once per shape for every kernel compared with it."""
  spec = lambda q, k, v: reference.attention(
      *(x.astype(jnp.float32) for x in (q, k, v)), ids, ids, causal=causal, window=window)
  out, vjp = jax.vjp(spec, q, k, v)
  return (out, *vjp(d_out.astype(jnp.float32)))


def assert_close(got, want, tolerance, name, floor=1e-6):
  """Error relative to the largest wanted value, or to `floor` where that is smaller (a
  gradient that is zero, as dq and dk are when each query sees only itself)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  error = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), floor)
  assert error < tolerance, f'{name}: relative error {error:.2e} >= {tolerance:.0e}'


def assert_kernel_matches_reference(kernel, q, k, v, d_out, ids, floor=1e-6, block_sizes=None,
                                    tolerance=None, **options):
  """Output and the three gradients of `kernel` against the reference (float32 unless
  `tolerance` is given)."""
  got = kernel_values_and_grads(q, k, v, d_out, ids, implementation=kernel,
                                block_sizes=block_sizes or SMALL_BLOCKS.get(kernel), **options)
  want = reference_values_and_grads(q, k, v, d_out, ids, **options)
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert_close(g, w, tolerance or backend.matmul_tolerance(1e-5), name, floor)
  return got


CASES = [
    # (causal, num_heads, num_kv_heads, head_dim, length, segments): GQA, three documents,
    # a length no block divides. The rest of the grid is in the integration tier.
    (True, 4, 2, 64, 100, 'packed'),
]


@pytest.mark.parametrize('kernel', KERNELS)
@pytest.mark.parametrize('causal,num_heads,num_kv_heads,head_dim,length,segments', CASES)
def test_kernel_matches_reference_forward_and_gradients_in_float32(
    kernel, causal, num_heads, num_kv_heads, head_dim, length, segments):
  q, k, v, d_out = inputs(length + head_dim, 2, length, num_heads, num_kv_heads, head_dim,
                          jnp.float32)
  ids = segment_ids(2, length, segments)
  assert_kernel_matches_reference(kernel, q, k, v, d_out, ids, causal=causal)


def test_reference_window_is_the_mask_written_out():
  """The reference's sliding window against attention computed query by query: query t
  of a packed row sees key s of its document when 0 <= t - s < window."""
  batch, length, num_heads, num_kv_heads, head_dim = 1, 13, 2, 1, 8
  q, k, v, _ = inputs(11, batch, length, num_heads, num_kv_heads, head_dim, jnp.float32)
  ids = segment_ids(batch, length, 'packed')
  q_, k_, v_, ids_ = (np.asarray(x, np.float64) for x in (q, k, v, ids))
  for window in (1, 3, 20):
    out, lse = reference.attention_with_lse(q, k, v, ids, ids, window=window)
    for n in range(num_heads):
      for t in range(length):
        keys = [s for s in range(length) if ids_[0, s] == ids_[0, t] and 0 <= t - s < window]
        logits = np.array([q_[0, t, n] @ k_[0, s, 0] for s in keys]) / np.sqrt(head_dim)
        weights = np.exp(logits - logits.max())
        want = sum(w * v_[0, s, 0] for w, s in zip(weights, keys)) / weights.sum()
        np.testing.assert_allclose(out[0, t, n], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lse[0, n, t], logits.max() + np.log(weights.sum()),
                                   rtol=1e-5)


def test_window_must_be_a_positive_int_and_causal():
  q, k, v, _ = inputs(9, 1, 8, 2, 2, 16, jnp.float32)
  for window in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match='must be a positive int or None'):
      api.flash_attention(q, k, v, window=window)
  with pytest.raises(ValueError, match='needs causal=True'):
    api.flash_attention(q, k, v, causal=False, window=4)


WINDOW_CASES = [
    # (num_heads, num_kv_heads, length, segments, window): GPU blocks are 32, TPU's 128.
    (2, 1, 260, 'none', 100),  # Spans blocks; whole blocks out of the window (TPU too).
]


@pytest.mark.parametrize('kernel', KERNELS)
@pytest.mark.parametrize('num_heads,num_kv_heads,length,segments,window', WINDOW_CASES)
def test_kernel_with_a_sliding_window_matches_reference_forward_and_gradients(
    kernel, num_heads, num_kv_heads, length, segments, window):
  q, k, v, d_out = inputs(length + window, 2, length, num_heads, num_kv_heads, 64, jnp.float32)
  ids = segment_ids(2, length, segments)
  assert_kernel_matches_reference(kernel, q, k, v, d_out, ids, floor=1.0, window=window)


@pytest.mark.parametrize('kernel', KERNELS)
def test_default_blocks_handle_a_sequence_shorter_than_one_block(kernel):
  q, k, v, _ = inputs(3, 1, 20, 2, 1, 64, jnp.float32)
  got = api.flash_attention(q, k, v, implementation=kernel, interpret=backend.INTERPRET)
  assert_close(got, reference.attention(q, k, v), backend.matmul_tolerance(1e-5), 'out')


@pytest.mark.parametrize('kernel', KERNELS)
@pytest.mark.parametrize('head_dim,window', [(128, 300)])
def test_kernel_lowers_for_its_hardware_forward_and_backward(kernel, head_dim, window):
  """Runs the real (Triton or Mosaic) lowering, so a kernel its hardware cannot compile
  fails here; forward is one kernel, the gradient three (forward, dq, dk/dv)."""
  batch, length, num_heads, num_kv_heads = 2, 1000, 8, 2
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  args = (shape(batch, length, num_heads, head_dim), shape(batch, length, num_kv_heads, head_dim),
          shape(batch, length, num_kv_heads, head_dim), shape(batch, length, dtype=jnp.int32))
  attention = lambda q, k, v, ids: api.flash_attention(q, k, v, ids, ids, window=window,
                                                       implementation=kernel)
  grads = jax.grad(lambda *a: jnp.sum(attention(*a).astype(jnp.float32)), argnums=(0, 1, 2))
  assert lowering.count_kernel_calls(kernel, attention, *args) == 1
  assert lowering.count_kernel_calls(kernel, grads, *args) == 3


def test_unsupported_shapes_fall_back_to_the_reference_with_a_log_line(caplog):
  q, k, v, _ = inputs(5, 1, 16, 3, 1, 48, jnp.float32)  # head_dim 48, 3 heads per kv head.
  with caplog.at_level('WARNING'):
    got = api.flash_attention(q, k, v, implementation='gpu', interpret=backend.INTERPRET)
  assert "falling back to the reference" in caplog.text and "head_dim=48" in caplog.text
  assert_close(got, reference.attention(q, k, v), 1e-6, 'out')


@pytest.mark.skipif(backend.ON_DEVICE, reason='checks the CPU dispatch')
def test_on_cpu_the_dispatch_picks_the_reference():
  q, k, v, _ = inputs(6, 1, 8, 2, 2, 16, jnp.float32)
  np.testing.assert_array_equal(api.flash_attention(q, k, v), reference.attention(q, k, v))


@pytest.mark.parametrize('hopper, dtype, head_dim, want', [
    (True, jnp.bfloat16, 128, 'mosaic_gpu'), (True, jnp.float32, 128, 'gpu'),
    (True, jnp.bfloat16, 32, 'gpu'), (False, jnp.bfloat16, 128, 'gpu')])
def test_on_a_gpu_hopper_gets_the_mosaic_kernels_where_they_take_the_inputs(
    monkeypatch, hopper, dtype, head_dim, want):
  picked = []
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(mosaic_gpu, 'runs_here', lambda: hopper)
  monkeypatch.setattr(api, '_kernel_attention',
                      lambda kernel, *_: lambda q, *__: picked.append(kernel) or q)
  q, k, v, _ = inputs(7, 1, 8, 2, 2, head_dim, dtype)
  api.flash_attention(q, k, v)
  assert picked == [want]


def test_block_sizes_for_another_kernel_are_refused_by_name():
  q, k, v, _ = inputs(8, 1, 8, 2, 2, 64, jnp.bfloat16)
  with pytest.raises(ValueError, match='not the mosaic_gpu kernel'):
    api.flash_attention(q, k, v, implementation='mosaic_gpu', block_sizes=gpu.BlockSizes())


# The Mosaic GPU (Hopper) kernels take bf16 and f16 only. Their forward and gradients against
# the reference cost several seconds a case in the interpreter: all are in the integration tier.
@pytest.mark.skipif(not MOSAIC_ON_THIS_BACKEND, reason='a GPU kernel')
def test_mosaic_hands_float32_to_the_reference_with_a_log_line(caplog):
  q, k, v, _ = inputs(12, 1, 40, 2, 1, 64, jnp.float32)
  with caplog.at_level('WARNING'):
    got = api.flash_attention(q, k, v, implementation='mosaic_gpu', interpret=backend.INTERPRET)
  assert 'falling back to the reference' in caplog.text and 'float32' in caplog.text
  assert_close(got, reference.attention(q, k, v), 1e-6, 'out')


def test_mosaic_block_sizes_that_do_not_fit_are_refused():
  with pytest.raises(ValueError, match='block_kv=96'):
    mosaic_gpu.BlockSizes(block_kv=96)
  q = jnp.zeros((1, 128, 1, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match='shared memory'):
    mosaic_gpu.forward(q, q, q, None, None, causal=True, sm_scale=1.0,
                       block_sizes=mosaic_gpu.BlockSizes(block_kv=256, stages=3),
                       interpret=True)
