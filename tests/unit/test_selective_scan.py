"""The selective-scan kernels and the chunked scan against the lax.scan reference, the
kernels in interpret mode on CPU and lowered for their real hardware with jax.export: for
each kernel an awkward shape, forward and gradients. The rest of the grids (other shapes,
chunks and GPU backward options, bf16), and the benchmark's smoke run, are in
tests/integration/test_selective_scan_grid.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan import api, gpu, reference, tpu

import backend
import lowering

KERNELS = backend.kernels(api.KERNELS)
# Small blocks so test shapes span several channel blocks and (TPU) time blocks.
SMALL_BLOCKS = {'gpu': gpu.BlockSizes(block_e=8, chunk=4),
                'tpu': tpu.BlockSizes(block_e=128, block_t=128)}


def scan_inputs(seed, batch=2, length=37, channels=6, state=4, dtype=jnp.float32,
                reset_rate=0.1):
  """Fresh random inputs in the model's ranges: dt > 0, A < 0; resets at random steps."""
  keys = jax.random.split(jax.random.key(seed), 7)
  x = jax.random.normal(keys[0], (batch, length, channels), dtype)
  dt = jax.nn.softplus(jax.random.normal(keys[1], (batch, length, channels)) - 1.0)
  a = -jnp.exp(jax.random.normal(keys[2], (channels, state)))
  b = jax.random.normal(keys[3], (batch, length, state), dtype)
  c = jax.random.normal(keys[4], (batch, length, state), dtype)
  reset = jax.random.bernoulli(keys[5], reset_rate, (batch, length)).at[:, 0].set(True)
  dy = jax.random.normal(keys[6], (batch, length, channels), dtype)
  return (x, dt, a, b, c, reset), dy


@functools.partial(jax.jit, static_argnums=0)
def value_and_grads(scan, inputs, dy):
  """y and the gradients of sum(y * dy) for x, dt, a, b, c, compiled as one program (the
  reference's once per shape, for every scan compared with it)."""
  *differentiable, reset = inputs
  y, vjp = jax.vjp(lambda *args: scan(*args, reset), *differentiable)
  return (y, *vjp(dy))


def assert_close(got, want, tolerance, name):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  error = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6)
  assert error < tolerance, f'{name}: relative error {error:.2e} >= {tolerance:.0e}'


NAMES = ('y', 'dx', 'ddt', 'da', 'db', 'dc')


def assert_kernel_matches_reference(kernel, block_sizes, inputs, dy, tolerance=1e-5):
  """y and the five gradients of the kernel at `block_sizes` against lax.scan's (float32
  unless `tolerance` is given); returns the kernel's."""
  scan = functools.partial(api.selective_scan, implementation=kernel, block_sizes=block_sizes,
                           interpret=backend.INTERPRET)
  want = value_and_grads(reference.selective_scan, inputs, dy)
  got = value_and_grads(scan, inputs, dy)
  for name, g, w in zip(NAMES, got, want):
    assert_close(g, w, tolerance, name)
  return got


def test_reference_follows_the_recurrence_step_by_step():
  (x, dt, a, b, c, reset), _ = scan_inputs(0, batch=1, length=12)
  x, dt, a, b, c, reset = map(np.asarray, (x, dt, a, b, c, reset))
  h = np.zeros((x.shape[2], a.shape[1]))
  want = []
  for t in range(x.shape[1]):
    decay = 0.0 if reset[0, t] else np.exp(dt[0, t][:, None] * a)
    h = decay * h + (dt[0, t] * x[0, t])[:, None] * b[0, t][None, :]
    want.append(h @ c[0, t])
  got = reference.selective_scan(*map(jnp.asarray, (x, dt, a, b, c, reset)))
  np.testing.assert_allclose(got[0], np.stack(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('chunk', [8])  # 16 and 64: the integration tier.
def test_chunked_scan_matches_the_reference_with_gradients(chunk):
  inputs, dy = scan_inputs(1)
  want = value_and_grads(reference.selective_scan, inputs, dy)
  got = value_and_grads(functools.partial(reference.selective_scan_chunked, chunk=chunk),
                        inputs, dy)
  for name, g, w in zip(NAMES, got, want):
    assert_close(g, w, 1e-5, name)


@pytest.mark.parametrize('length', [1, 37])  # One decode step; a prefill over chunks.
def test_chunked_scan_from_a_state_matches_the_reference_and_its_final_state(length):
  inputs, _ = scan_inputs(2, length=length)
  h0 = jax.random.normal(jax.random.key(5), (2, 6, 4))
  want_y, want_h = reference.scan_from_state(h0, *inputs)
  got_y, got_h = reference.chunked_scan_from_state(h0, *inputs, chunk=16)
  assert_close(got_y, want_y, 1e-5, 'y')
  assert_close(got_h, want_h, 1e-5, 'final state')


SHAPES = [
    # (batch, length, channels, state); the rest of the grid is in the integration tier.
    (2, 37, 6, 4),  # Every dimension padded.
]


@pytest.mark.parametrize('kernel', KERNELS)
@pytest.mark.parametrize('batch,length,channels,state', SHAPES)
def test_kernel_matches_reference_forward_and_gradients_in_float32(
    kernel, batch, length, channels, state):
  inputs, dy = scan_inputs(length, batch, length, channels, state)
  assert_kernel_matches_reference(kernel, SMALL_BLOCKS[kernel], inputs, dy)


def test_gpu_block_sizes_name_a_bad_field():
  with pytest.raises(ValueError, match='backward_block_e=3 must be a power of two or 0'):
    gpu.BlockSizes(backward_block_e=3)
  with pytest.raises(ValueError, match='block_e=0 must be a power of two'):
    gpu.BlockSizes(block_e=0)


@pytest.mark.parametrize('kernel', KERNELS)
def test_kernel_lowers_for_its_hardware_forward_and_backward(kernel):
  """Runs the real (Triton or Mosaic) lowering at the model's shapes in bf16: forward is
  one kernel, the gradient two (forward saving states, backward)."""
  batch, length, channels, state = 2, 1000, 320, 16
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  args = (shape(batch, length, channels), shape(batch, length, channels, dtype=jnp.float32),
          shape(channels, state, dtype=jnp.float32), shape(batch, length, state),
          shape(batch, length, state), shape(batch, length, dtype=jnp.bool_))
  scan = lambda *a: api.selective_scan(*a, implementation=kernel)
  grads = jax.grad(lambda *a: jnp.sum(scan(*a).astype(jnp.float32)), argnums=range(5))
  assert lowering.count_kernel_calls(kernel, scan, *args) == 1
  assert lowering.count_kernel_calls(kernel, grads, *args) == 2


@pytest.mark.skipif(backend.ON_DEVICE, reason='checks the CPU dispatch')
def test_on_cpu_the_dispatch_runs_the_chunked_scan():
  inputs, _ = scan_inputs(3)
  got = api.selective_scan(*inputs)
  np.testing.assert_array_equal(got, reference.selective_scan_chunked(*inputs))


def test_mismatched_shapes_name_the_argument():
  (x, dt, a, b, c, reset), _ = scan_inputs(4)
  with pytest.raises(ValueError, match=r'b.shape=\(2, 37, 5\) should be \(2, 37, 4\)'):
    api.selective_scan(x, dt, a, jnp.zeros((2, 37, 5)), c, reset)
  with pytest.raises(ValueError, match='not one of'):
    api.selective_scan(x, dt, a, b, c, reset, implementation='cuda')
