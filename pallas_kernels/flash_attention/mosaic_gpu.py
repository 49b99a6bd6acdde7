"""Flash attention forward for Hopper GPUs in Pallas Mosaic GPU (wgmma and TMA).

Why a second GPU kernel: the Triton one (gpu.py) tops out near 320 TFLOP/s forward on
the H100 (docs/benchmarks.md); Hopper's tensor cores are fed at full rate only by
warpgroup MMAs (wgmma) reading operands from shared memory that the TMA unit fills
asynchronously, which Triton's Pallas lowering does not give us control of.

Algorithm (FlashAttention-3's warp specialisation, Shah et al. 2024). One CTA per
(query tile of 2 * block_q rows, query head, batch row) runs three warpgroups:
  warpgroups 0 and 1 (compute): each holds block_q query rows in shared memory and, per
      key block, runs S = Q K^T as one wgmma into registers, the online softmax in base 2
      (log2 e folded into the scale), and O += P V as a second wgmma whose left operand P
      comes straight from registers. They write O and the row log-sum-exp (base 2, as the
      Triton backward expects).
  warpgroup 2 (memory): streams the kv head's key and value blocks by TMA into a ring of
      `stages` shared-memory slots. Each slot has a "ready" barrier (the TMA's arrival)
      and a "free" barrier both compute warpgroups arrive at when done with it, so loads
      for later blocks overlap the math on earlier ones.
Both compute warpgroups walk the same key blocks (those the CTA's last row can see when
causal), so the ring advances in lockstep; rows that cannot see a block get it masked.
Only blocks that cross the diagonal, or hold padding keys, build a mask.

GQA: query head n reads kv head n // groups straight from K and V (never repeated).
Segment ids (packed documents): each step loads its key block's ids from global memory
into registers and every block is masked. Padding: queries to a multiple of 2 * block_q
(rows sliced off), keys to a multiple of block_kv (masked by index).

The backward pass is the Triton kernels' (gpu.backward), from this forward's O and lse.

In interpret mode (tests on the CPU) the two matmuls run as jnp dots on the shared-memory
tiles: the interpreter of jax 0.10 cannot read a transposed wgmma operand, and none
can run wgmma with a register operand or a preinitialised accumulator. The pipeline,
barriers, masks and softmax are the kernel's own either way; the wgmma forms are checked
by lowering for the GPU (tests) and by running on one (docs/benchmarks.md).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import gpu as triton_gpu
from pallas_kernels.flash_attention.reference import MASK_VALUE
from pallas_kernels.padding import pad_axis

try:  # Exported from jax 0.11; jax 0.10 has it under _src only.
  InterpretParams = plgpu.InterpretGPUParams
except AttributeError:
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as InterpretParams

LOG2_E = triton_gpu.LOG2_E
_COMPUTE_WARPGROUPS = 2
_SMEM_BYTES = 227 * 1024  # Shared memory one CTA may use on the H100.
_ROW = plgpu.Layout.WGMMA.reduce(1)  # A [rows] vector laid out like a wgmma result's rows.
_COLUMN = plgpu.Layout.WGMMA.reduce(0)  # A [columns] vector likewise.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q: int = 64  # Query rows per compute warpgroup (wgmma's M is 64 per warpgroup).
  block_kv: int = 128  # Keys per pipeline step.
  stages: int = 2  # Key/value blocks in flight.

  def __post_init__(self):
    if self.block_q != 64:
      raise ValueError(f'block_q={self.block_q} must be 64 (one wgmma M per warpgroup)')
    if self.block_kv not in (64, 128, 192, 256):
      raise ValueError(f'block_kv={self.block_kv} must be 64, 128, 192 or 256')
    if self.stages < 2:
      raise ValueError(f'stages={self.stages} must be at least 2')


def unsupported(q, k) -> str | None:
  """Why this kernel cannot take these inputs, or None."""
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return f'dtype {q.dtype} (k {k.dtype}): wgmma takes bfloat16 or float16 here'
  if q.shape[-1] not in (64, 128):
    return f'head_dim={q.shape[-1]} is not 64 or 128'
  return None


def _smem_tile(shape, dtype):
  """A shared-memory buffer in the tiled, 128-byte-swizzled form wgmma and TMA read
  without bank conflicts (rows of 64 two-byte elements)."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                              plgpu.SwizzleTransform(128)))


def _with_layout(x, layout, interpret):
  """x in a register layout (a no-op in meaning; jax 0.10's interpreter lacks it)."""
  return x if interpret else plgpu.layout_cast(x, layout)


def _load(ref, layout, interpret):
  """A small vector straight from global memory into registers in `layout`."""
  return ref[...] if interpret else plgpu.load(ref, (), layout=layout, optimized=False)


def _iota(shape, dimension, interpret):
  if interpret:
    return lax.broadcasted_iota(jnp.int32, shape, dimension)
  return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)


def _logits_dot(q_smem, k_smem, block_q, block_kv, interpret):
  """Q K^T of one tile, float32 [block_q, block_kv], as one wgmma from shared memory."""
  if interpret:
    return jnp.dot(q_smem[...], k_smem[...].T, preferred_element_type=jnp.float32)

  def run(acc_ref):
    plgpu.wgmma(acc_ref, q_smem, k_smem.T)
    return acc_ref[...]  # Waits for the wgmma.
  return pl.run_scoped(run, plgpu.ACC((block_q, block_kv), jnp.float32))


def _accumulate_dot(acc, p, v_smem, interpret):
  """acc + P V, P from registers, accumulating in place in the wgmma registers."""
  if interpret:
    return acc + jnp.dot(p, v_smem[...], preferred_element_type=jnp.float32)

  def run(acc_ref):
    plgpu.wgmma(acc_ref, p, v_smem)
  return pl.run_state(run)(plgpu.ACC.init(acc))


def _forward_kernel(q_ref, k_ref, v_ref, q_segment_ref, kv_segment_ref, o_ref, lse_ref,
                    q_smem, k_smem, v_smem, lse_smem, q_ready, k_ready, v_ready, k_free,
                    v_free, *, scale, causal, segments, groups, kv_len, num_tiles, block_q,
                    block_kv, stages, interpret):
  batch, head = lax.axis_index('batch'), lax.axis_index('heads')
  # Causal tiles far from the start do the most work: start them first.
  tile = num_tiles - 1 - lax.axis_index('tiles') if causal else lax.axis_index('tiles')
  warpgroup = lax.axis_index('warpgroup')
  tile_rows = _COMPUTE_WARPGROUPS * block_q
  kv_blocks = k_ref.shape[1] // block_kv
  # Key blocks the CTA visits (its last row's, when causal), and how many of them need no
  # mask for any row of the CTA: wholly before its first row, and free of padding keys.
  num_steps, unmasked = kv_blocks, 0 if segments else kv_len // block_kv
  if causal:
    num_steps = jnp.minimum(lax.div((tile + 1) * tile_rows + block_kv - 1, block_kv), kv_blocks)
    unmasked = jnp.minimum(lax.div(tile * tile_rows, block_kv), unmasked)

  @pl.when(warpgroup < _COMPUTE_WARPGROUPS)
  def _compute():
    plgpu.set_max_registers(240, action='increase')
    row0 = tile * tile_rows + warpgroup * block_q
    q_tile = q_smem.at[warpgroup]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, block_q), head], q_tile,
                            q_ready.at[warpgroup])
    plgpu.barrier_wait(q_ready.at[warpgroup])
    if segments:
      q_segments = _load(q_segment_ref.at[batch, pl.ds(row0, block_q)], _ROW, interpret)

    def step(j, carry, masked):
      acc, m, l = carry
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_ready.at[slot])
      s = _logits_dot(q_tile, k_smem.at[slot], block_q, block_kv, interpret) * scale
      plgpu.barrier_arrive(k_free.at[slot])
      if masked:
        rows = row0 + _iota(s.shape, 0, interpret)
        cols = j * block_kv + _iota(s.shape, 1, interpret)
        visible = cols < kv_len
        if causal:
          visible = visible & (rows >= cols)
        if segments:
          kv_segments = _load(kv_segment_ref.at[batch, pl.ds(j * block_kv, block_kv)], _COLUMN,
                              interpret)
          visible = visible & (lax.broadcast_in_dim(q_segments, s.shape, [0]) ==
                               lax.broadcast_in_dim(kv_segments, s.shape, [1]))
        s = jnp.where(visible, s, MASK_VALUE)
      m_new = jnp.maximum(m, s.max(axis=1))
      correction = jnp.exp2(m - m_new)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
      l = l * correction + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
      plgpu.barrier_wait(v_ready.at[slot])
      acc = _accumulate_dot(acc, p.astype(q_ref.dtype), v_smem.at[slot], interpret)
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    head_dim = q_ref.shape[-1]
    carry = (_with_layout(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA,
                          interpret),
             _with_layout(jnp.full((block_q,), MASK_VALUE, jnp.float32), _ROW, interpret),
             _with_layout(jnp.zeros((block_q,), jnp.float32), _ROW, interpret))
    carry = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(unmasked, num_steps, functools.partial(step, masked=True), carry)

    q_tile[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(q_ref.dtype)
    lse_smem.at[warpgroup][...] = m + jnp.log2(l)
    plgpu.commit_smem()  # Make the stores visible to the TMA unit.
    plgpu.copy_smem_to_gmem(q_tile, o_ref.at[batch, pl.ds(row0, block_q), head])
    plgpu.copy_smem_to_gmem(lse_smem.at[warpgroup], lse_ref.at[batch, head, pl.ds(row0, block_q)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(warpgroup == _COMPUTE_WARPGROUPS)
  def _memory():
    plgpu.set_max_registers(40, action='decrease')  # Leaves registers to the math.
    kv_head = lax.div(head, groups)

    def load(j, slot):
      keys = (batch, pl.ds(j * block_kv, block_kv), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

    for j in range(min(stages, kv_blocks)):  # Fill the ring.
      if causal:
        pl.when(j < num_steps)(functools.partial(load, j, j))
      else:
        load(j, j)

    @pl.loop(stages, num_steps)
    def _refill(j):
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_free.at[slot])  # Both warpgroups are done with block j - stages.
      plgpu.barrier_wait(v_free.at[slot])
      load(j, slot)

    @pl.loop(jnp.maximum(num_steps - stages, 0), num_steps)
    def _drain(j):  # Observe the last frees too, so no barrier phase is left pending.
      slot = lax.rem(j, jnp.int32(stages))
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])


def _interpret_params(interpret):
  return InterpretParams() if interpret else None


def forward(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, sm_scale: float,
            block_sizes: BlockSizes, interpret: bool):
  """Returns out [B, T, N, H] and lse [B, N, T_padded] (float32, base 2)."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  block_q, block_kv, stages = block_sizes.block_q, block_sizes.block_kv, block_sizes.stages
  tile_rows = _COMPUTE_WARPGROUPS * block_q
  smem_bytes = (tile_rows + 2 * stages * block_kv) * head_dim * q.dtype.itemsize
  if smem_bytes > _SMEM_BYTES:
    raise ValueError(f'{block_sizes} at head_dim={head_dim} needs {smem_bytes} bytes of shared '
                     f'memory; a Hopper CTA has {_SMEM_BYTES}')
  q_pad = pl.cdiv(q_len, tile_rows) * tile_rows
  kv_pad = pl.cdiv(kv_len, block_kv) * block_kv
  q_p = pad_axis(q, q_pad, 1)
  k_p, v_p = pad_axis(k, kv_pad, 1), pad_axis(v, kv_pad, 1)
  segments = q_segment_ids is not None
  if not segments:  # Never read; the kernel's signature wants the operands.
    q_segment_ids = jnp.zeros((batch, q_len), jnp.int32)
    kv_segment_ids = jnp.zeros((batch, kv_len), jnp.int32)
  # Padding rows are sliced off and padding keys masked by index, so any id will do.
  q_ids = pad_axis(q_segment_ids.astype(jnp.int32), q_pad, 1)
  kv_ids = pad_axis(kv_segment_ids.astype(jnp.int32), kv_pad, 1)
  kernel = functools.partial(
      _forward_kernel, scale=sm_scale * LOG2_E, causal=causal, segments=segments,
      groups=num_heads // num_kv_heads, kv_len=kv_len, num_tiles=q_pad // tile_rows,
      block_q=block_q, block_kv=block_kv, stages=stages, interpret=interpret)
  barrier = lambda arrivals=1: plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages)
  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q_p.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, num_heads, q_pad), jnp.float32)),
      scratch_types=(
          _smem_tile((_COMPUTE_WARPGROUPS, block_q, head_dim), q.dtype),  # Q, then O.
          _smem_tile((stages, block_kv, head_dim), q.dtype),
          _smem_tile((stages, block_kv, head_dim), q.dtype),
          plgpu.SMEM((_COMPUTE_WARPGROUPS, block_q), jnp.float32),
          plgpu.Barrier(num_barriers=_COMPUTE_WARPGROUPS),
          barrier(), barrier(),
          barrier(_COMPUTE_WARPGROUPS), barrier(_COMPUTE_WARPGROUPS),
      ),
      grid=(q_pad // tile_rows, num_heads, batch),
      grid_names=('tiles', 'heads', 'batch'),
      num_threads=_COMPUTE_WARPGROUPS + 1,
      thread_name='warpgroup',
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret),
  )(q_p, k_p, v_p, q_ids, kv_ids)
  return out[:, :q_len], lse


def backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, causal: bool,
             sm_scale: float, block_sizes: BlockSizes, interpret: bool):
  """Gradients (dq, dk, dv) by the Triton kernels, from this forward's O and lse."""
  del block_sizes
  triton_blocks = triton_gpu.BlockSizes()
  q_len = q.shape[1]
  q_pad = pl.cdiv(q_len, triton_blocks.padding()[0]) * triton_blocks.padding()[0]
  lse = pad_axis(lse[..., :q_len], q_pad, 2)
  return triton_gpu.backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out,
                             causal=causal, sm_scale=sm_scale, block_sizes=triton_blocks,
                             interpret=interpret)
