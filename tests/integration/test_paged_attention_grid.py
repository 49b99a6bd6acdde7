"""The rest of the paged-attention grids of tests/unit/test_paged_attention.py (the Pallas
kernels against the reference in interpret mode on CPU, over more shapes, dtypes, windows
and launch settings), the kernels lowered for their hardware with jax.export, the TPU
kernel compiled by libtpu's compiler, and the benchmark's smoke run."""

import functools

import jax
import jax.numpy as jnp
import pytest

from lm import aot
from pallas_kernels.paged_attention import api, gpu

import backend
import lowering
from helpers import ROOT, cpu_subprocess_env
from test_paged_attention import (GPU_ON_THIS_BACKEND, TPU_ON_THIS_BACKEND,
                                  assert_kernel_matches_reference)

on_gpu_or_interpreted = pytest.mark.skipif(
    not GPU_ON_THIS_BACKEND, reason='the GPU kernel runs on a GPU or in the interpreter')


# (num_heads, num_kv_heads, head_dim, page_size, pages_per_row, lengths): among the
# lengths one slot, a page exactly, one past a page, the full table and an idle row. The
# unit tier's two cases are not repeated here.
CASES = [
    (4, 4, 64, 16, 6, [1, 16, 17, 96, 0, 50]),
    (8, 2, 64, 32, 4, [128, 31, 33, 0]),
    (8, 1, 128, 16, 3, [48, 1, 20]),
    (32, 2, 16, 16, 4, [64, 15, 0]),  # A group of 16: the dot's rows without padding.
    (32, 1, 64, 16, 3, [40, 1, 16]),  # A group of 32: more than the 16 rows a dot needs.
    (2, 2, 128, 64, 3, [192, 65, 0, 64]),
]

@on_gpu_or_interpreted
@pytest.mark.parametrize('num_heads,num_kv_heads,head_dim,page_size,pages_per_row,lengths,'
                         'dtype,tolerance', [
    pytest.param(*case, dtype, tolerance,
                 id=f'{jnp.dtype(dtype).name}-' + '-'.join(map(str, case[:5])))
    for dtype, tolerance in [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)] for case in CASES])
def test_kernel_matches_reference(num_heads, num_kv_heads, head_dim, page_size, pages_per_row,
                                  lengths, dtype, tolerance):
  assert_kernel_matches_reference(
      sum(lengths) + head_dim, lengths, num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, page_size=page_size, pages_per_row=pages_per_row, dtype=dtype,
      tolerance=tolerance)


# Lengths around the window's edge: shorter than the window, at it, and its first slot on
# either side of a page boundary (page_size 16).
@on_gpu_or_interpreted
@pytest.mark.parametrize('window', [1, 15, 16, 17, 40, 200])  # Unit: 20.
@pytest.mark.parametrize('dtype,tolerance', [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_kernel_with_a_sliding_window_matches_reference(window, dtype, tolerance):
  assert_kernel_matches_reference(
      window, [1, 16, 17, 33, 80, 0, 47], num_heads=8, num_kv_heads=2, head_dim=32,
      page_size=16, pages_per_row=5, dtype=dtype, tolerance=tolerance, window=window)


@on_gpu_or_interpreted
@pytest.mark.parametrize('block_sizes', [gpu.BlockSizes(num_warps=1, num_stages=1),
                                         gpu.BlockSizes(num_warps=8, num_stages=3)])
def test_kernel_matches_reference_at_other_launch_settings(block_sizes):
  assert_kernel_matches_reference(
      5, [33, 2, 64], num_heads=4, num_kv_heads=2, head_dim=32, page_size=16,
      pages_per_row=4, dtype=jnp.float32, tolerance=1e-5, block_sizes=block_sizes)


@pytest.mark.parametrize('head_dim,num_heads,num_kv_heads,page_size,window,dtype', [
    (64, 12, 12, 16, None, jnp.bfloat16), (128, 32, 8, 16, None, jnp.bfloat16),
    (128, 16, 2, 64, 100, jnp.bfloat16), (64, 8, 1, 32, None, jnp.float32)])
def test_kernel_lowers_for_its_gpu(head_dim, num_heads, num_kv_heads, page_size, window,
                                   dtype):
  """The real Triton lowering: a kernel the GPU cannot compile fails here."""
  shape = lambda *s, dtype=dtype: jax.ShapeDtypeStruct(s, dtype)
  args = (shape(4, num_heads, head_dim), shape(200, page_size, num_kv_heads, head_dim),
          shape(200, page_size, num_kv_heads, head_dim), shape(4, 50, dtype=jnp.int32),
          shape(4, dtype=jnp.int32))
  step = functools.partial(api.paged_attention, window=window, implementation='gpu')
  assert lowering.count_kernel_calls('gpu', step, *args) == 1


# (num_heads, num_kv_heads, head_dim, page_size, pages_per_row, lengths, window): the
# TPU kernel's heads are whole 128-lane tiles. The unit tier's two are not repeated here.
TPU_CASES = [
    (4, 4, 128, 16, 5, [1, 16, 17, 80, 0, 50], None),
    (16, 2, 128, 32, 3, [96, 31, 0], None),  # A group of 8: one sublane tile.
    (6, 2, 256, 16, 4, [64, 2, 33], None),  # A group of 3, padded to 8 rows.
    (8, 1, 128, 16, 5, [1, 16, 17, 33, 80, 0, 47], 1),
    (8, 1, 128, 16, 5, [1, 16, 17, 33, 80, 0, 47], 16),
    (8, 1, 128, 16, 5, [1, 16, 17, 33, 80, 0, 47], 17),
    (8, 1, 128, 16, 5, [1, 16, 17, 33, 80, 0, 47], 200),
]


@pytest.mark.skipif(not TPU_ON_THIS_BACKEND, reason='the TPU kernel runs on a TPU or in the '
                    'interpreter')
@pytest.mark.parametrize('num_heads,num_kv_heads,head_dim,page_size,pages_per_row,lengths,'
                         'window,dtype,tolerance', [
    pytest.param(*case, dtype, tolerance,
                 id=f'{jnp.dtype(dtype).name}-' + '-'.join(map(str, case[:5] + case[6:])))
    for dtype, tolerance in [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)] for case in TPU_CASES])
def test_tpu_kernel_matches_reference(num_heads, num_kv_heads, head_dim, page_size,
                                      pages_per_row, lengths, window, dtype, tolerance):
  assert_kernel_matches_reference(
      sum(lengths) + head_dim, lengths, num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, page_size=page_size, pages_per_row=pages_per_row, dtype=dtype,
      tolerance=tolerance, window=window, implementation='tpu')


TPU_SHAPES = [(128, 32, 8, 16, None, jnp.bfloat16), (128, 16, 2, 64, 100, jnp.bfloat16),
              (256, 8, 1, 32, None, jnp.float32), (128, 8, 8, 16, 7, jnp.float32)]


def tpu_args(head_dim, num_heads, num_kv_heads, page_size, dtype, **sharding):
  shape = lambda *s, dtype=dtype: jax.ShapeDtypeStruct(s, dtype, **sharding)
  return (shape(4, num_heads, head_dim), shape(200, page_size, num_kv_heads, head_dim),
          shape(200, page_size, num_kv_heads, head_dim), shape(4, 50, dtype=jnp.int32),
          shape(4, dtype=jnp.int32))


@pytest.mark.parametrize('head_dim,num_heads,num_kv_heads,page_size,window,dtype', TPU_SHAPES)
def test_tpu_kernel_lowers_for_its_tpu(head_dim, num_heads, num_kv_heads, page_size, window,
                                       dtype):
  step = functools.partial(api.paged_attention, window=window, implementation='tpu')
  args = tpu_args(head_dim, num_heads, num_kv_heads, page_size, dtype)
  assert lowering.count_kernel_calls('tpu', step, *args) == 1


@pytest.mark.parametrize('head_dim,num_heads,num_kv_heads,page_size,window,dtype', TPU_SHAPES)
def test_tpu_kernel_compiles_for_a_v5e(head_dim, num_heads, num_kv_heads, page_size, window,
                                       dtype):
  """libtpu's compiler on the CPU (lm/aot.py) runs Mosaic's own passes on the kernel: a
  layout or VMEM budget a TPU refuses fails here."""
  sharding = jax.sharding.SingleDeviceSharding(aot.target('v5e-4').devices[0])
  args = tpu_args(head_dim, num_heads, num_kv_heads, page_size, dtype, sharding=sharding)
  step = jax.jit(functools.partial(api.paged_attention, window=window, implementation='tpu'))
  assert 'tpu_custom_call' in step.lower(*args).compile().as_text()


@pytest.mark.skipif(backend.ON_DEVICE, reason='the CPU smoke run of the benchmark')
def test_benchmark_script_runs_on_a_tiny_shape_in_interpret_mode():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  result = subprocess.run(
      [sys.executable, '-m', 'pallas_kernels.benchmarks.paged_attention', '--shapes=40:2',
       '--heads=4', '--kv_heads=2', '--head_dim=16', '--page_size=16', '--dtype=float32',
       '--interpret', '--repeats=1', '--window=24'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=cpu_subprocess_env())
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'window 24, float32' in result.stdout
  for name in ('pallas (ours)', 'reference', 'decode_attention (contiguous)'):
    assert f'| {name} | 40 | 2 |' in result.stdout, result.stdout
