"""The rest of the flash-attention grids of tests/unit/test_flash_attention.py (every shape
and option there was, less the few the unit tier runs), the Mosaic GPU kernels, and the
benchmark's smoke run: the kernels in interpret mode on CPU against the reference, and
lowered for their real hardware with jax.export."""

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import api, gpu, mosaic_gpu, reference

import backend
import lowering
from helpers import ROOT, cpu_subprocess_env
import test_flash_attention as unit
from test_flash_attention import (KERNELS, MOSAIC_ON_THIS_BACKEND, assert_close,
                                  assert_kernel_matches_reference, inputs,
                                  kernel_values_and_grads, reference_values_and_grads,
                                  segment_ids)


@pytest.fixture(scope='module', autouse=True)
def mosaic_interpreter_compiles_a_kernel_once():
  """jax 0.10's Mosaic GPU interpreter compiles each warpgroup's program again at every
  grid point (thread_map._run_jaxpr jits a new function per call): dozens of compiles of
  the same program per kernel, most of these tests' time. Here each program is compiled
  at its first grid point and run at the others, as that module's comment expects JAX's
  caches to do; what runs is the same."""
  try:
    from jax._src.pallas.mosaic.interpret import thread_map
  except ImportError:
    thread_map = None
  if not hasattr(thread_map, '_run_jaxpr'):
    yield
    return
  compiled, lock = {}, threading.Lock()

  def run_jaxpr(jaxpr, consts, *args):
    with lock:  # The warpgroups' threads start together: the first compiles, the rest wait.
      if jaxpr not in compiled:
        compiled[jaxpr] = jax.jit(functools.partial(jax.core.eval_jaxpr, jaxpr)).lower(
            consts, *args).compile()
    compiled[jaxpr](consts, *args)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(thread_map, '_run_jaxpr', run_jaxpr)
    yield


CASES = [
    # (causal, num_heads, num_kv_heads, head_dim, length, segments); the unit tier runs
    # (True, 4, 2, 64, 100, 'packed').
    (True, 4, 4, 64, 64, 'none'),
    (False, 4, 2, 64, 100, 'packed'),
    (True, 8, 1, 64, 77, 'padded'),
    (False, 2, 2, 128, 45, 'none'),
    (True, 4, 1, 128, 96, 'packed'),
    (False, 2, 1, 64, 64, 'none'),  # No padding, no segments: no mask at all.
]


@pytest.mark.parametrize('kernel', KERNELS)
@pytest.mark.parametrize('causal,num_heads,num_kv_heads,head_dim,length,segments', CASES)
def test_kernel_matches_reference_forward_and_gradients_in_float32(
    kernel, causal, num_heads, num_kv_heads, head_dim, length, segments):
  unit.test_kernel_matches_reference_forward_and_gradients_in_float32(
      kernel, causal, num_heads, num_kv_heads, head_dim, length, segments)


WINDOW_CASES = [
    # (num_heads, num_kv_heads, length, segments, window): GPU blocks are 32, TPU's 128. The
    # unit tier runs (2, 1, 260, 'none', 100).
    (4, 2, 100, 'packed', 1),  # Each query sees itself only: dq and dk are zero.
    (2, 1, 100, 'padded', 20),  # Narrower than a block.
    (2, 2, 128, 'none', 40),  # No padding nor segments: unmasked blocks in between (GPU).
    (4, 1, 70, 'packed', 500),  # Wider than the row: plain causal attention.
]


@pytest.mark.parametrize('kernel', KERNELS)
@pytest.mark.parametrize('num_heads,num_kv_heads,length,segments,window', WINDOW_CASES)
def test_kernel_with_a_sliding_window_matches_reference_forward_and_gradients(
    kernel, num_heads, num_kv_heads, length, segments, window):
  unit.test_kernel_with_a_sliding_window_matches_reference_forward_and_gradients(
      kernel, num_heads, num_kv_heads, length, segments, window)


# Forward, dq and dkv each with their own tile, key blocks larger than query blocks in some.
GPU_TILES = gpu.BlockSizes(forward=gpu.Tile(block_q=16, block_k=32),
                           dq=gpu.Tile(block_q=32, block_k=16),
                           dkv=gpu.Tile(block_q=16, block_k=64))


@pytest.mark.skipif('gpu' not in KERNELS, reason='GPU tiling')
@pytest.mark.parametrize('causal,length,segments,window', [
    (True, 64, 'none', None), (True, 100, 'packed', None), (False, 64, 'none', None),
    (True, 128, 'none', 40)])
def test_gpu_kernels_tiled_differently_agree_with_the_reference(causal, length, segments,
                                                                window):
  """Forward, dq and dkv each with their own tile, key blocks larger than query blocks
  in some: the diagonal split, the window's edge and the padding must still line up."""
  q, k, v, d_out = inputs(length, 2, length, 4, 2, 64, jnp.float32)
  ids = segment_ids(2, length, segments)
  assert_kernel_matches_reference('gpu', q, k, v, d_out, ids, block_sizes=GPU_TILES,
                                  causal=causal, window=window)


@pytest.mark.parametrize('kernel', KERNELS)
def test_kernel_in_bfloat16_stays_within_bfloat16_tolerance(kernel):
  q, k, v, d_out = inputs(7, 1, 70, 4, 2, 64, jnp.bfloat16)
  ids = segment_ids(1, 70, 'packed')
  # The reference in float32 on the same bf16 values is the target.
  got = assert_kernel_matches_reference(kernel, q, k, v, d_out, ids, tolerance=2e-2)
  assert got[0].dtype == jnp.bfloat16


@pytest.mark.parametrize('kernel', KERNELS)
@pytest.mark.parametrize('head_dim,window', [(64, None), (128, None)])  # Unit: (128, 300).
def test_kernel_lowers_for_its_hardware_forward_and_backward(kernel, head_dim, window):
  """Runs the real (Triton or Mosaic) lowering, so a kernel its hardware cannot compile
  fails here; forward is one kernel, the gradient three (forward, dq, dk/dv)."""
  unit.test_kernel_lowers_for_its_hardware_forward_and_backward(kernel, head_dim, window)


@pytest.mark.skipif(backend.ON_DEVICE, reason='the CPU smoke run of the benchmark')
def test_benchmark_script_runs_on_a_tiny_shape_in_interpret_mode():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  result = subprocess.run(
      [sys.executable, '-m', 'pallas_kernels.benchmarks.attention', '--shapes=64:1',
       '--heads=2', '--head_dim=64', '--dtype=float32', '--interpret', '--repeats=1',
       '--kernel_blocks=32:32:4:2,16:32:4:2/32:16:4:2/16:32:4:2', '--window=48'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=cpu_subprocess_env())
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'causal, window 48, float32' in result.stdout
  assert '| pallas (ours) | 64 | 1 |' in result.stdout
  assert '| pallas (ours) 32:32:4:2 | 64 | 1 |' in result.stdout
  assert '| pallas (ours) 16:32:4:2/32:16:4:2/16:32:4:2 | 64 | 1 |' in result.stdout
  assert '| pallas mosaic (ours) | 64 | 1 | unsupported: dtype float32' in result.stdout


# The Mosaic GPU (Hopper) kernels: bf16 and f16 only.
MOSAIC_CASES = [
    # (causal, num_heads, num_kv_heads, head_dim, length, block_kv, segments, pingpong,
    # window). (The gradient test below covers packed causal, and padding without a causal
    # mask.)
    (True, 2, 1, 64, 200, 64, 'none', True, None),  # Padded queries and keys; 2 key blocks a tile.
    (True, 2, 2, 128, 256, 128, 'none', False, None),  # No padding: the mask only on diagonal blocks.
    (False, 2, 2, 64, 100, 128, 'padded', False, None),
    (True, 1, 1, 64, 200, 64, 'packed', False, 50),  # A window narrower than a block.
]


@pytest.mark.skipif(not MOSAIC_ON_THIS_BACKEND, reason='a GPU kernel')
@pytest.mark.parametrize(
    'causal,num_heads,num_kv_heads,head_dim,length,block_kv,segments,pingpong,window',
    MOSAIC_CASES)
def test_mosaic_forward_matches_the_reference_in_bfloat16(causal, num_heads, num_kv_heads,
                                                          head_dim, length, block_kv, segments,
                                                          pingpong, window):
  batch = 1 if segments == 'none' else 2  # Two rows where the ids are per row.
  q, k, v, _ = inputs(length + head_dim, batch, length, num_heads, num_kv_heads, head_dim,
                      jnp.bfloat16)
  ids = segment_ids(batch, length, segments)
  out, lse = mosaic_gpu.forward(q, k, v, ids, ids, causal=causal, sm_scale=head_dim ** -0.5,
                                block_sizes=mosaic_gpu.BlockSizes(block_kv=block_kv,
                                                                  pingpong=pingpong),
                                interpret=backend.INTERPRET, window=window)
  want_out, want_lse = reference.attention_with_lse(
      *(x.astype(jnp.float32) for x in (q, k, v)), ids, ids, causal=causal, window=window)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  assert_close(out, want_out, 1e-2, 'out')
  # lse is base 2 and padded to the query tile; the reference's is natural.
  assert_close(lse[..., :length] * np.log(2), want_lse, 1e-5 if backend.INTERPRET else 1e-3, 'lse')


@pytest.mark.skipif(not MOSAIC_ON_THIS_BACKEND, reason='a GPU kernel')
@pytest.mark.parametrize('causal,num_heads,num_kv_heads,head_dim,length,segments,window', [
    (True, 4, 2, 64, 100, 'packed', None),
    (True, 1, 1, 64, 300, 'none', None),  # dk/dv: diagonal, unmasked and padding query blocks.
    (False, 2, 2, 128, 130, 'none', None),
    # Whole key blocks before the window of later tiles, whole query blocks after the
    # windows over earlier ones, unmasked blocks between the edges.
    (True, 2, 1, 64, 300, 'none', 100),
])
def test_mosaic_kernels_give_reference_gradients(causal, num_heads, num_kv_heads, head_dim,
                                                 length, segments, window):
  q, k, v, d_out = inputs(length, 1, length, num_heads, num_kv_heads, head_dim, jnp.bfloat16)
  ids = segment_ids(1, length, segments)
  got = kernel_values_and_grads(q, k, v, d_out, ids, implementation='mosaic_gpu',
                                causal=causal, window=window)
  want = reference_values_and_grads(q, k, v, d_out, ids, causal=causal, window=window)
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert_close(g, w, 2e-2, name)


@pytest.mark.parametrize('head_dim', [64, 128])
def test_mosaic_lowers_for_hopper_forward_and_backward(head_dim):
  """The Mosaic GPU lowering (wgmma, TMA, barriers) on the CPU: the forward is one
  Mosaic call, the gradient three (forward, dq, dk/dv)."""
  batch, length, num_heads, num_kv_heads = 2, 1000, 8, 2
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  args = (shape(batch, length, num_heads, head_dim), shape(batch, length, num_kv_heads, head_dim),
          shape(batch, length, num_kv_heads, head_dim), shape(batch, length, dtype=jnp.int32))
  for causal, segments, window in ((True, True, None), (False, False, None), (True, False, 300)):
    attention = lambda q, k, v, ids: api.flash_attention(
        q, k, v, *((ids, ids) if segments else ()), causal=causal, window=window,
        implementation='mosaic_gpu')
    grads = jax.grad(lambda *a: jnp.sum(attention(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    assert lowering.count_kernel_calls('mosaic_gpu', attention, *args) == 1
    assert lowering.count_kernel_calls('mosaic_gpu', grads, *args) == 3
  # The default forward runs the ping-pong schedule; lower the plain one too.
  plain = lambda q, k, v, ids: api.flash_attention(
      q, k, v, implementation='mosaic_gpu', block_sizes=mosaic_gpu.BlockSizes(pingpong=False))
  assert lowering.count_kernel_calls('mosaic_gpu', plain, *args) == 1
