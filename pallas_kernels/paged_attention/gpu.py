"""One decoding step of attention over a paged KV cache, for GPUs in Pallas (Triton
lowering).

Dimension letters as in reference.py: B, N, K, G, H, and P pages of S slots, M pages in a
row's table.

One program per (batch row, kv head) holds the group's queries [G, H] and walks the row's
pages in table order up to its length (with a sliding window, only the pages that hold
slots in the window), with an online softmax in float32, base 2. Each step reads the
page's id from the table (a scalar load) and loads that page's [S, H] keys and values of
its kv head, so every page is one contiguous load per head of S rows of H. Slots past
the length, or before the window, in the first and last pages are masked at the load (they
may hold anything) and in the scores. Memory traffic: each seen page's keys and values
once, per kv head, and the table row; no gather of the pages into a contiguous copy.
Scores and values are tensor-core dots with the group padded to 16 query rows: the
padding costs nothing in a step bound by latency, and the dots keep the instruction count
small. Inference only: there is no backward pass.
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
  # A page is the unit of each loop step (its size is the cache's, not a tiling choice):
  # what is left to tune is the launch.
  num_warps: int = 4
  num_stages: int = 2  # Triton prefetches the next pages' keys and values.

  def __post_init__(self):
    if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
      raise ValueError(f'{self.num_warps=} must be a power of two')
    if self.num_stages < 1:
      raise ValueError(f'{self.num_stages=} must be at least 1')


def unsupported(q_bnh, k_pages_pskh) -> str | None:
  """Why Triton cannot take these shapes, or None: the flash kernel's limits (powers of
  two for the head dim and the group), and a page of a power of two slots, at least 16
  (a dot's smallest side; Triton blocks are powers of two)."""
  page_size = k_pages_pskh.shape[1]
  if page_size < 16 or page_size & (page_size - 1):
    return f'{page_size=} is not a power of two, at least 16'
  return flash_gpu.unsupported_heads(q_bnh.shape[-1], q_bnh.shape[1] // k_pages_pskh.shape[2])


def _kernel(lengths_ref, page_table_ref, q_ref, k_pages_ref, v_pages_ref, o_ref, *, scale,
            window):
  row, head = pl.program_id(0), pl.program_id(1)
  num_pages, page_size = k_pages_ref.shape[:2]
  pages_per_row = page_table_ref.shape[1]
  # A length past the table, or a page id outside the pool (a caller's error), must not
  # read memory outside them.
  length = jnp.clip(lengths_ref[row], 0, pages_per_row * page_size)
  q = q_ref[row, head, :, :]  # [rows, H]: the group's queries, zero rows below.

  def body(j, carry):
    m, l, acc = carry
    page = jnp.clip(page_table_ref[row, j], 0, num_pages - 1)
    behind = length - 1 - (j * page_size + jnp.arange(page_size))  # Slots before the token.
    seen = behind >= 0
    if window is not None:
      seen &= behind < window
    k = plgpu.load(k_pages_ref.at[page, :, head, :], mask=seen[:, None], other=0)  # [S, H]
    v = plgpu.load(v_pages_ref.at[page, :, head, :], mask=seen[:, None], other=0)
    s = plgpu.dot(q.astype(k.dtype), k, trans_b=True).astype(jnp.float32) * scale
    s = jnp.where(seen[None, :], s, MASK_VALUE)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
    return m_next, l, acc

  # Every page visited holds at least one seen slot: from the one holding the window's
  # first slot, length - window, to the one holding the token, length - 1.
  first = 0 if window is None else lax.div(jnp.maximum(length - window, 0), page_size)
  last = lax.div(length + page_size - 1, page_size)
  m = jnp.full((q.shape[0],), MASK_VALUE, jnp.float32)
  l = jnp.zeros_like(m)
  acc = jnp.zeros(q.shape, jnp.float32)
  _, l, acc = lax.fori_loop(first, last, body, (m, l, acc))
  # A row of length 0 visits no page: l = 0, acc = 0, and its output is 0.
  o_ref[row, head, :, :] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def paged_attention(q_bnh, k_pages_pskh, v_pages_pskh, page_table_bm, lengths_b, *,
                    sm_scale: float, window: int | None = None,
                    block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """See reference.paged_attention."""
  batch, num_heads, head_dim = q_bnh.shape
  num_kv_heads = k_pages_pskh.shape[2]
  groups = num_heads // num_kv_heads
  rows = max(16, groups)  # Tensor-core dots take 16 rows at least: pad the group with zeros.
  q_bkgh = jnp.pad(q_bnh.reshape(batch, num_kv_heads, groups, head_dim),
                   ((0, 0), (0, 0), (0, rows - groups), (0, 0)))  # G padded to `rows`.
  out = pl.pallas_call(
      functools.partial(_kernel, scale=sm_scale * flash_gpu.LOG2_E, window=window),
      grid=(batch, num_kv_heads),
      out_shape=jax.ShapeDtypeStruct(q_bkgh.shape, q_bnh.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                           num_stages=block_sizes.num_stages),
      interpret=interpret,
      name='paged_attention',
  )(lengths_b.astype(jnp.int32), page_table_bm.astype(jnp.int32), q_bkgh, k_pages_pskh,
    v_pages_pskh)
  return out[:, :, :groups].reshape(batch, num_heads, head_dim)
