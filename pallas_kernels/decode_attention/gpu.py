"""One decoding step of attention over a KV cache, for GPUs in Pallas (Triton lowering).

Why a kernel: at small batch a decode step is a chain of tiny XLA kernels, and their
count, not their memory traffic, sets its time. In XLA this step is a scatter per cache
(with its bounds checks), the scores, a max, a sum and two reductions for the values;
here it is one kernel that writes the new key and value into the caches (aliased, so in
place) and attends.

Dimension letters as in lm/__init__.py: B, S (cache slots), N, K, G, H.

One program per (batch row, kv head) holds the group's queries [G, H] and streams the
filled cache slots in blocks of `block_s` with an online softmax (float32, base 2); with
a sliding window, only the blocks that hold slots in the window. The new token is taken
from registers rather than read back from the slot it was just written to, so the
program never reads its own write. Scores and values are tensor-core dots with the group
padded to 16 query rows: the padding costs nothing in a step bound by latency, and the
dots keep the instruction count small.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention import gpu as flash_gpu
from pallas_kernels.flash_attention.reference import MASK_VALUE


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_s: int = 64  # Cache slots per loop step; a power of two, at least 16.
  num_warps: int = 4
  num_stages: int = 2  # Triton prefetches the next blocks of keys and values.

  def __post_init__(self):
    if self.block_s < 16 or self.block_s & (self.block_s - 1):
      raise ValueError(f'{self.block_s=} must be a power of two, at least 16')


def unsupported(q_bnh, k_cache_bskh) -> str | None:
  """Why Triton cannot take these shapes, or None: the flash kernel's limits (powers of
  two for the head dim and the group), which are this kernel's too."""
  return flash_gpu.unsupported_heads(q_bnh.shape[-1], q_bnh.shape[1] // k_cache_bskh.shape[2])


def _kernel(start_ref, q_ref, k_ref, v_ref, k_cache_ref, v_cache_ref, o_ref, k_out_ref,
            v_out_ref, *, scale, window, block_s):
  row, head = pl.program_id(0), pl.program_id(1)
  num_slots = k_cache_ref.shape[1]
  # A start past the cache (a caller's error) must not touch memory outside it.
  start = jnp.minimum(start_ref[row], num_slots)
  in_cache = jnp.broadcast_to(start < num_slots, k_ref.shape[-1:])
  q = q_ref[row, head, :, :]  # [rows, H]: the group's queries, zero rows below.
  k_new = k_ref[row, head, :]
  v_new = v_ref[row, head, :]
  # The outputs alias the caches (the same buffers on the GPU): slots before start are
  # read through the inputs, the new slot is written through the outputs.
  plgpu.store(k_out_ref.at[row, start, head, :], k_new.astype(k_out_ref.dtype), mask=in_cache)
  plgpu.store(v_out_ref.at[row, start, head, :], v_new.astype(v_out_ref.dtype), mask=in_cache)

  # The running max starts at the new token's score, so its weight is 1.
  q32 = q.astype(jnp.float32)
  m = jnp.sum(q32 * k_new.astype(jnp.float32)[None, :], axis=1) * scale  # [rows]
  l = jnp.ones_like(m)
  acc = jnp.broadcast_to(v_new.astype(jnp.float32)[None, :], q.shape)

  def body(j, carry):
    m, l, acc = carry
    slots = pl.ds(j * block_s, block_s)
    slot = j * block_s + jnp.arange(block_s)
    seen = slot < start
    if window is not None:
      seen &= slot > start - window
    k = plgpu.load(k_cache_ref.at[row, slots, head, :], mask=seen[:, None], other=0)
    v = plgpu.load(v_cache_ref.at[row, slots, head, :], mask=seen[:, None], other=0)
    s = plgpu.dot(q.astype(k.dtype), k, trans_b=True).astype(jnp.float32) * scale
    s = jnp.where(seen[None, :], s, MASK_VALUE)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
    return m_next, l, acc

  # Blocks before the one holding the window's first slot, start - window + 1, are unseen.
  first = 0 if window is None else lax.div(jnp.maximum(start - window + 1, 0), block_s)
  _, l, acc = lax.fori_loop(first, lax.div(start + block_s - 1, block_s), body, (m, l, acc))
  o_ref[row, head, :, :] = (acc / l[:, None]).astype(o_ref.dtype)


def decode_attention(q_bnh, k_bkh, v_bkh, k_cache_bskh, v_cache_bskh, start_b, *,
                     sm_scale: float, block_sizes: BlockSizes = BlockSizes(),
                     interpret: bool = False, window: int | None = None):
  """See reference.decode_attention; the caches come back updated in place."""
  batch, num_heads, head_dim = q_bnh.shape
  num_kv_heads = k_cache_bskh.shape[2]
  groups = num_heads // num_kv_heads
  rows = max(16, groups)  # Tensor-core dots take 16 rows at least: pad the group with zeros.
  q_bkgh = jnp.pad(q_bnh.reshape(batch, num_kv_heads, groups, head_dim),
                   ((0, 0), (0, 0), (0, rows - groups), (0, 0)))  # G padded to `rows`.
  out, k_cache_bskh, v_cache_bskh = pl.pallas_call(
      functools.partial(_kernel, scale=sm_scale * flash_gpu.LOG2_E, window=window,
                        block_s=block_sizes.block_s),
      grid=(batch, num_kv_heads),
      out_shape=[jax.ShapeDtypeStruct(q_bkgh.shape, q_bnh.dtype),
                 jax.ShapeDtypeStruct(k_cache_bskh.shape, k_cache_bskh.dtype),
                 jax.ShapeDtypeStruct(v_cache_bskh.shape, v_cache_bskh.dtype)],
      input_output_aliases={4: 1, 5: 2},
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                           num_stages=block_sizes.num_stages),
      interpret=interpret,
      name='decode_attention',
  )(start_b.astype(jnp.int32), q_bkgh, k_bkh, v_bkh, k_cache_bskh, v_cache_bskh)
  return out[:, :, :groups].reshape(batch, num_heads, head_dim), k_cache_bskh, v_cache_bskh
