"""The selective-scan kernels and the chunked scan against the lax.scan reference, the
kernels in interpret mode on CPU and lowered for their real hardware with jax.export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan import api, gpu, reference, tpu

import backend
import lowering
from helpers import ROOT, cpu_subprocess_env

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


def value_and_grads(scan, inputs, dy):
  """y and the gradients of sum(y * dy) for x, dt, a, b, c."""
  *differentiable, reset = inputs
  y, vjp = jax.vjp(lambda *args: scan(*args, reset), *differentiable)
  return (y, *vjp(dy))


def assert_close(got, want, tolerance, name):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  error = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6)
  assert error < tolerance, f'{name}: relative error {error:.2e} >= {tolerance:.0e}'


NAMES = ('y', 'dx', 'ddt', 'da', 'db', 'dc')


def assert_kernel_matches_reference(kernel, block_sizes, inputs, dy):
  """y and the five gradients of the kernel at `block_sizes` against lax.scan's, float32."""
  scan = lambda *a: api.selective_scan(*a, implementation=kernel, block_sizes=block_sizes,
                                       interpret=backend.INTERPRET)
  want = value_and_grads(reference.selective_scan, inputs, dy)
  got = value_and_grads(scan, inputs, dy)
  for name, g, w in zip(NAMES, got, want):
    assert_close(g, w, 1e-5, name)


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


@pytest.mark.parametrize('chunk', [8, 16, 64])
def test_chunked_scan_matches_the_reference_with_gradients(chunk):
  inputs, dy = scan_inputs(1)
  want = value_and_grads(reference.selective_scan, inputs, dy)
  got = value_and_grads(lambda *a: reference.selective_scan_chunked(*a, chunk=chunk), inputs, dy)
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
    # (batch, length, channels, state)
    (2, 37, 6, 4),  # Every dimension padded.
    (1, 260, 20, 16),  # Several time blocks; the model's state size.
    (3, 64, 16, 5),  # State not a power of two.
]


@pytest.mark.parametrize('kernel', KERNELS)
@pytest.mark.parametrize('batch,length,channels,state', SHAPES)
def test_kernel_matches_reference_forward_and_gradients_in_float32(
    kernel, batch, length, channels, state):
  inputs, dy = scan_inputs(length, batch, length, channels, state)
  assert_kernel_matches_reference(kernel, SMALL_BLOCKS[kernel], inputs, dy)


@pytest.mark.skipif('gpu' not in KERNELS, reason='GPU backward options')
@pytest.mark.parametrize('blocks', [
    gpu.BlockSizes(block_e=8, chunk=4, atomic_sums=True),
    gpu.BlockSizes(block_e=4, chunk=4, backward_block_e=8, backward_prefetch=False),
    gpu.BlockSizes(block_e=8, chunk=4, backward_block_e=2, atomic_sums=True),
], ids=['atomic_sums', 'wider_backward_no_prefetch', 'narrower_backward_atomic'])
def test_gpu_backward_tiling_and_atomic_sums_match_the_reference(blocks):
  """dB, dC summed by atomic adds across channel blocks, backward channel blocks other
  than the forward's (10 channels: both pad to the larger block), the backward loading
  each chunk when it starts rather than the chunk before."""
  inputs, dy = scan_inputs(11, 2, 37, 10, 4)
  assert_kernel_matches_reference('gpu', blocks, inputs, dy)


def test_gpu_block_sizes_name_a_bad_field():
  with pytest.raises(ValueError, match='backward_block_e=3 must be a power of two or 0'):
    gpu.BlockSizes(backward_block_e=3)
  with pytest.raises(ValueError, match='block_e=0 must be a power of two'):
    gpu.BlockSizes(block_e=0)


@pytest.mark.parametrize('kernel', KERNELS)
def test_kernel_with_bfloat16_inputs_keeps_a_float32_state(kernel):
  """bf16 x, B, C, dy (dt and A float32, as the model gives them): the kernel's float32
  state matches the reference's on the same bf16 inputs within bf16 rounding of y."""
  inputs, dy = scan_inputs(7, 2, 150, 12, 16, dtype=jnp.bfloat16, reset_rate=0.02)
  scan = lambda *a: api.selective_scan(*a, implementation=kernel, interpret=backend.INTERPRET)
  want = value_and_grads(reference.selective_scan, inputs, dy)
  got = value_and_grads(scan, inputs, dy)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
  for name, g, w in zip(NAMES, got, want):
    assert_close(g, w, 1e-2, name)


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


def test_gpu_backward_options_lower_for_the_gpu():
  """With atomic sums, channel blocks of its own and no prefetch the backward is still
  one kernel (the gradient two, with the forward), and lowers."""
  blocks = gpu.BlockSizes(backward_block_e=4, atomic_sums=True, backward_prefetch=False)
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  args = (shape(2, 1000, 320), shape(2, 1000, 320, dtype=jnp.float32),
          shape(320, 16, dtype=jnp.float32), shape(2, 1000, 16), shape(2, 1000, 16),
          shape(2, 1000, dtype=jnp.bool_))
  scan = lambda *a: api.selective_scan(*a, implementation='gpu', block_sizes=blocks)
  grads = jax.grad(lambda *a: jnp.sum(scan(*a).astype(jnp.float32)), argnums=range(5))
  assert lowering.count_kernel_calls('gpu', scan, *args) == 1
  assert lowering.count_kernel_calls('gpu', grads, *args) == 2


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


@pytest.mark.skipif(backend.ON_DEVICE, reason='the CPU smoke run of the benchmark')
def test_benchmark_script_runs_on_a_tiny_shape_in_interpret_mode():
  import os
  import subprocess
  import sys
  root = ROOT
  result = subprocess.run(
      [sys.executable, '-m', 'pallas_kernels.benchmarks.selective_scan', '--shape=1:64:16:4',
       '--interpret', '--repeats=1',
       # chunk=2: the loop bodies are unrolled, and interpret mode compiles them all.
       '--kernel_blocks=16:2:2:atomic_sums=1:backward_block_e=4,8:2:1:backward_prefetch=0'],
      cwd=root, capture_output=True, text=True, timeout=300,
      env=cpu_subprocess_env())
  assert result.returncode == 0, result.stderr[-2000:]
  assert '| lax.scan (reference) |' in result.stdout
  assert 'pallas gpu (ours) BlockSizes(block_e=16, chunk=2, num_warps=2' in result.stdout
  assert 'num_stages=1, backward_block_e=4, atomic_sums=True,' in result.stdout  # By name.
  assert ('BlockSizes(block_e=8, chunk=2, num_warps=1, num_stages=1, backward_block_e=0, '
          'atomic_sums=False, backward_prefetch=False)') in result.stdout
  assert 'failed' not in result.stdout
  rows = [line for line in result.stdout.splitlines() if line.startswith('| pallas')]
  assert len(rows) == 3 and all(float(row.split('|')[-2]) < 1e-5 for row in rows), rows
