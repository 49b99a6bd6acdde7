"""One decoding step of attention over a paged KV cache, for TPUs in Pallas (Mosaic
lowering).

Dimension letters as in reference.py: B, N, K, G, H, and P pages of S slots, M pages in a
row's table.

The grid is (batch row, kv head, table entry), the table entries innermost and sequential
("arbitrary"). The page table and the lengths are prefetched into SMEM (scalar prefetch),
so the index maps of the keys and values pick each step's page from the table: the
pipeline copies page page_table[b, j]'s [S, H] block of the kv head into VMEM while the
step before computes. Entries outside the row's pages that hold seen slots (past its
length, before its window) map to the nearest seen page, which the grid visits next to
them, so no new copy happens, and compute nothing. The running max, normaliser and
float32 accumulator live in VMEM scratch across the row's pages (the max and normaliser
128 lanes wide, as Mosaic tiles (8, 128)); the group's queries are padded to a multiple
of 8 rows. Memory traffic: each seen page's keys and values once per kv head. The grid
has a step for every table entry of every row, so a table much wider than the lengths
costs empty steps (no copy, no compute, only the step's overhead).

Mosaic tiles the last two dimensions of each block by (8, 128): the pages are viewed as
[P, S, K * H] (a free reshape) so a kv head's block is [S, H] with H a multiple of 128.
Inference only: there is no backward pass.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention.reference import MASK_VALUE

_LANES, _SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Nothing to tile: a page is each grid step's block (its size is the cache's)."""


def unsupported(q_bnh, k_pages_pskh) -> str | None:
  """Why Mosaic cannot take these shapes, or None: a kv head's [S, H] block must be whole
  (8, 128) tiles, 16 rows for bf16."""
  head_dim, page_size = q_bnh.shape[-1], k_pages_pskh.shape[1]
  if head_dim % _LANES:
    return f'{head_dim=} is not a multiple of {_LANES}'
  if page_size % 16:
    return f'{page_size=} is not a multiple of 16'
  return None


def _pages(length, page_size, window):
  """[first, last): the table entries that hold slots the row's token sees."""
  first = 0 if window is None else lax.div(jnp.maximum(length - window, 0), page_size)
  return first, lax.div(length + page_size - 1, page_size)


def _kernel(lengths_ref, page_table_ref, q_ref, k_ref, v_ref, o_ref, m_scratch, l_scratch,
            acc_scratch, *, sm_scale, window, page_size):
  row, entry = pl.program_id(0), pl.program_id(2)
  length = lengths_ref[row]

  @pl.when(entry == 0)
  def _reset():
    m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  first, last = _pages(length, page_size, window)

  @pl.when((first <= entry) & (entry < last))
  def _compute():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [rows, H], [S, H], [S, H]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32) * sm_scale  # [rows, S]
    behind = length - 1 - (entry * page_size + lax.broadcasted_iota(jnp.int32, s.shape, 1))
    seen = behind >= 0
    if window is not None:
      seen &= behind < window
    s = jnp.where(seen, s, MASK_VALUE)
    # Unseen slots may hold anything, NaN included: 0 * NaN must not reach the sum.
    behind_v = length - 1 - (entry * page_size + lax.broadcasted_iota(jnp.int32, v.shape, 0))
    seen_v = behind_v >= 0
    if window is not None:
      seen_v &= behind_v < window
    v = jnp.where(seen_v, v, jnp.zeros_like(v))
    m_previous = m_scratch[:, 0:1]  # [rows, 1]
    m_new = jnp.maximum(m_previous, jnp.max(s, axis=1, keepdims=True))
    correction = jnp.exp(m_previous - m_new)
    p = jnp.exp(s - m_new)
    l_new = l_scratch[:, 0:1] * correction + jnp.sum(p, axis=1, keepdims=True)
    acc_scratch[...] = acc_scratch[...] * correction + lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    m_scratch[...] = jnp.broadcast_to(m_new, m_scratch.shape)
    l_scratch[...] = jnp.broadcast_to(l_new, l_scratch.shape)

  @pl.when(entry == pl.num_programs(2) - 1)
  def _write():
    l = l_scratch[:, 0:1]
    # A row of length 0 computes nothing: l = 0, acc = 0, and its output is 0.
    o_ref[...] = (acc_scratch[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def paged_attention(q_bnh, k_pages_pskh, v_pages_pskh, page_table_bm, lengths_b, *,
                    sm_scale: float, window: int | None = None,
                    block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """See reference.paged_attention."""
  del block_sizes
  batch, num_heads, head_dim = q_bnh.shape
  num_pages, page_size, num_kv_heads = k_pages_pskh.shape[:3]
  pages_per_row = page_table_bm.shape[1]
  groups = num_heads // num_kv_heads
  rows = -(-groups // _SUBLANES) * _SUBLANES  # The group padded to whole sublane tiles.
  q_bkgh = jnp.pad(q_bnh.reshape(batch, num_kv_heads, groups, head_dim),
                   ((0, 0), (0, 0), (0, rows - groups), (0, 0)))
  # A kv head's keys of one page: lanes [head * H, (head + 1) * H) of [S, K * H].
  k_pages = k_pages_pskh.reshape(num_pages, page_size, num_kv_heads * head_dim)
  v_pages = v_pages_pskh.reshape(num_pages, page_size, num_kv_heads * head_dim)
  # A length past the table, or a page id outside the pool (a caller's error), must not
  # make the pipeline copy memory outside them.
  lengths_b = jnp.clip(lengths_b.astype(jnp.int32), 0, pages_per_row * page_size)
  page_table_bm = jnp.clip(page_table_bm.astype(jnp.int32), 0, num_pages - 1)

  def page(b, head, entry, lengths_ref, page_table_ref):
    first, last = _pages(lengths_ref[b], page_size, window)
    # Entries without seen slots fetch the nearest one that has them: no new copy.
    return page_table_ref[b, jnp.clip(entry, first, jnp.maximum(last - 1, first))], 0, head

  q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, head, entry, *_: (b, head, 0, 0))
  kv_spec = pl.BlockSpec((None, page_size, head_dim), page)
  out = pl.pallas_call(
      functools.partial(_kernel, sm_scale=sm_scale, window=window, page_size=page_size),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, num_kv_heads, pages_per_row),
          in_specs=[q_spec, kv_spec, kv_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((rows, _LANES), jnp.float32),
                          pltpu.VMEM((rows, _LANES), jnp.float32),
                          pltpu.VMEM((rows, head_dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q_bkgh.shape, q_bnh.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='paged_attention_tpu',
  )(lengths_b, page_table_bm, q_bkgh, k_pages, v_pages)
  return out[:, :, :groups].reshape(batch, num_heads, head_dim)
