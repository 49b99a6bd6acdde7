"""The rest of the selective-scan grids of tests/unit/test_selective_scan.py (every shape
and option there was, less the few the unit tier runs), and the benchmark's smoke run: the
kernels in interpret mode on CPU against the lax.scan reference, and lowered for their
real hardware with jax.export."""


import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.selective_scan import api, gpu

import backend
import lowering
from helpers import ROOT, cpu_subprocess_env
import test_selective_scan as unit
from test_selective_scan import (KERNELS, assert_kernel_matches_reference, scan_inputs)


@pytest.mark.parametrize('chunk', [16, 64])  # The unit tier runs 8.
def test_chunked_scan_matches_the_reference_with_gradients(chunk):
  unit.test_chunked_scan_matches_the_reference_with_gradients(chunk)


SHAPES = [
    # (batch, length, channels, state); the unit tier runs (2, 37, 6, 4).
    (1, 260, 20, 16),  # Several time blocks; the model's state size.
    (3, 64, 16, 5),  # State not a power of two.
]


@pytest.mark.parametrize('kernel', KERNELS)
@pytest.mark.parametrize('batch,length,channels,state', SHAPES)
def test_kernel_matches_reference_forward_and_gradients_in_float32(
    kernel, batch, length, channels, state):
  unit.test_kernel_matches_reference_forward_and_gradients_in_float32(
      kernel, batch, length, channels, state)


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


@pytest.mark.parametrize('kernel', KERNELS)
def test_kernel_with_bfloat16_inputs_keeps_a_float32_state(kernel):
  """bf16 x, B, C, dy (dt and A float32, as the model gives them): the kernel's float32
  state matches the reference's on the same bf16 inputs within bf16 rounding of y."""
  inputs, dy = scan_inputs(7, 2, 150, 12, 16, dtype=jnp.bfloat16, reset_rate=0.02)
  got = assert_kernel_matches_reference(kernel, None, inputs, dy, tolerance=1e-2)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16


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


@pytest.mark.skipif(backend.ON_DEVICE, reason='the CPU smoke run of the benchmark')
def test_benchmark_script_runs_on_a_tiny_shape_in_interpret_mode():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  result = subprocess.run(
      [sys.executable, '-m', 'pallas_kernels.benchmarks.selective_scan', '--shape=1:4:8:2',
       '--interpret', '--repeats=1',
       # chunk=2: the loop bodies are unrolled, and interpret mode compiles them all.
       '--kernel_blocks=16:2:2:atomic_sums=1:backward_block_e=4,8:2:1:backward_prefetch=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
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
