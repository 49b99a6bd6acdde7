"""Flash attention for TPUs in Pallas (Mosaic lowering), forward and backward.

Dimension letters as in lm/__init__.py: B, T, S, N, K, H.

Algorithm (FlashAttention-2): the grid is (batch, query head, query block, key block)
with the key blocks innermost and sequential ("arbitrary"); the running max m,
normaliser l and float32 accumulator live in VMEM scratch across them, are reset at
the first key block and written out (O and lse) at the last. Causal tiles above the
diagonal, and with a sliding window tiles wholly before the window of every query in the
tile, are skipped: no compute, and the index maps point them at a neighbouring tile that
is fetched anyway, so no DMA either (the pipeline copies only when a block index
changes). Query head n reads kv head n // groups through the index map, so K/V are never
repeated. Memory traffic: Q and O once; K and V once per query block (only the blocks
some query of it sees).

Backward recomputes probabilities from Q, K and lse: dq with grid (batch, head, query
block, key block), key blocks sequential; dk/dv with grid (batch, kv head, key block,
query head in the group, query block), the last two sequential, so each kv head's
gradient sums its whole group in VMEM without atomics.

Mosaic tiles the last two dimensions of every block by (8, 128), so the kernels work in
[B, N, T, H] layout (the wrapper transposes), keep segment ids lane-replicated for
queries [B, T, 128] and sublane-replicated for keys [B, 8, S], and per-row values
(m, l, lse, delta) 128 lanes wide.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.padding import pad_axis
from pallas_kernels.flash_attention.reference import MASK_VALUE

_LANES, _SUBLANES = 128, 8
_QUERY_PAD_SEGMENT, _KEY_PAD_SEGMENT = -1, -2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q: int = 128
  block_k: int = 128

  def __post_init__(self):
    for name in ('block_q', 'block_k'):
      if getattr(self, name) % _LANES:
        raise ValueError(f'{name}={getattr(self, name)} must be a multiple of {_LANES}')


def unsupported(q, k) -> str | None:
  """Why this kernel cannot take these shapes, or None."""
  del k
  if q.shape[-1] not in (64, 128, 256):
    return f'head_dim={q.shape[-1]} is not 64, 128 or 256'
  return None


@dataclasses.dataclass(frozen=True)
class _Tiles:
  """Which tiles a mask leaves anything in: a kernel skips the others (no compute) and
  its index maps send them to a tile it fetches anyway (no DMA)."""
  causal: bool
  window: int | None
  block_q: int
  block_k: int
  q_blocks: int
  kv_blocks: int

  @property
  def skips(self) -> bool:
    return self.causal  # A window implies causal.

  def key_blocks(self, q_block):
    """The first and last key block (inclusive) some query of `q_block` sees."""
    first, last = 0, self.kv_blocks - 1
    if self.causal:
      last = jnp.minimum(lax.div((q_block + 1) * self.block_q - 1, self.block_k), last)
    if self.window is not None:  # The block's first query sees back to here.
      first = lax.div(jnp.maximum(q_block * self.block_q - self.window + 1, 0), self.block_k)
    return first, last

  def query_blocks(self, k_block):
    """The first and last query block (inclusive) with a query that sees `k_block`."""
    first, last = 0, self.q_blocks - 1
    if self.causal:
      first = lax.div(k_block * self.block_k, self.block_q)
    if self.window is not None:  # The block's last key is in the windows of queries to here.
      last = jnp.minimum(
          lax.div((k_block + 1) * self.block_k + self.window - 2, self.block_q), last)
    return first, last

  def fetched(self, block, first_and_last):
    """The block the pipeline fetches at grid index `block`: itself if it is seen, else
    the nearest seen one, which the grid visits next to it, so nothing new is copied."""
    if not self.skips:
      return block
    first, last = first_and_last
    return jnp.minimum(jnp.maximum(block, first), last)

  def when_seen(self, compute, block, first_and_last):
    """Runs `compute` if `block` is in [first, last]."""
    first, last = first_and_last
    pl.when((first <= block) & (block <= last))(compute) if self.skips else compute()


def _scores_and_mask(q_ref, k_ref, q_segment_ref, k_segment_ref, q_block, k_block, *,
                     sm_scale, tiles):
  """Scaled scores q k^T of one [block_q, block_k] tile (float32) and where they count."""
  s = lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                      preferred_element_type=jnp.float32) * sm_scale
  mask = q_segment_ref[:, 0:1] == k_segment_ref[0:1, :]
  if tiles.causal:
    q_index = q_block * tiles.block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    k_index = k_block * tiles.block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    mask &= q_index >= k_index
    if tiles.window is not None:
      mask &= q_index - k_index < tiles.window
  return s, mask


def _forward_kernel(q_ref, k_ref, v_ref, q_segment_ref, k_segment_ref, o_ref, lse_ref,
                    m_scratch, l_scratch, acc_scratch, *, sm_scale, tiles):
  q_block, k_block = pl.program_id(2), pl.program_id(3)

  @pl.when(k_block == 0)
  def _reset():
    m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  def compute():
    s, mask = _scores_and_mask(q_ref, k_ref, q_segment_ref, k_segment_ref, q_block, k_block,
                               sm_scale=sm_scale, tiles=tiles)
    s = jnp.where(mask, s, MASK_VALUE)
    m_previous = m_scratch[:, 0:1]  # [block_q, 1]
    m_new = jnp.maximum(m_previous, jnp.max(s, axis=1, keepdims=True))
    correction = jnp.exp(m_previous - m_new)
    p = jnp.exp(s - m_new)
    l_new = l_scratch[:, 0:1] * correction + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_scratch[...] = acc_scratch[...] * correction + lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    m_scratch[...] = jnp.broadcast_to(m_new, m_scratch.shape)
    l_scratch[...] = jnp.broadcast_to(l_new, l_scratch.shape)

  tiles.when_seen(compute, k_block, tiles.key_blocks(q_block))

  @pl.when(k_block == pl.num_programs(3) - 1)
  def _write():
    l = l_scratch[:, 0:1]
    o_ref[...] = (acc_scratch[...] / l).astype(o_ref.dtype)
    lse_ref[...] = m_scratch[...] + jnp.log(l_scratch[...])


def _probabilities(q_ref, k_ref, q_segment_ref, k_segment_ref, lse_ref, q_block, k_block, *,
                   sm_scale, tiles):
  """The forward's softmax tile [block_q, block_k], recomputed from lse."""
  s, mask = _scores_and_mask(q_ref, k_ref, q_segment_ref, k_segment_ref, q_block, k_block,
                             sm_scale=sm_scale, tiles=tiles)
  return jnp.where(mask, jnp.exp(s - lse_ref[:, 0:1]), 0.0)


def _dq_kernel(q_ref, k_ref, v_ref, q_segment_ref, k_segment_ref, do_ref, lse_ref, delta_ref,
               dq_ref, dq_scratch, *, sm_scale, tiles):
  q_block, k_block = pl.program_id(2), pl.program_id(3)

  @pl.when(k_block == 0)
  def _reset():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  def compute():
    p = _probabilities(q_ref, k_ref, q_segment_ref, k_segment_ref, lse_ref, q_block, k_block,
                       sm_scale=sm_scale, tiles=tiles)
    dp = lax.dot_general(do_ref[...], v_ref[...], (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[:, 0:1])
    k = k_ref[...]
    dq_scratch[...] += lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)

  tiles.when_seen(compute, k_block, tiles.key_blocks(q_block))

  @pl.when(k_block == pl.num_programs(3) - 1)
  def _write():
    dq_ref[...] = (dq_scratch[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_segment_ref, k_segment_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, dk_scratch, dv_scratch, *, sm_scale, tiles):
  k_block, group, q_block = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((group == 0) & (q_block == 0))
  def _reset():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  def compute():
    p = _probabilities(q_ref, k_ref, q_segment_ref, k_segment_ref, lse_ref, q_block, k_block,
                       sm_scale=sm_scale, tiles=tiles)
    do = do_ref[...]
    dv_scratch[...] += lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v_ref[...], (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[:, 0:1])
    q = q_ref[...]
    dk_scratch[...] += lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)

  tiles.when_seen(compute, q_block, tiles.query_blocks(k_block))

  @pl.when((group == pl.num_programs(3) - 1) & (q_block == pl.num_programs(4) - 1))
  def _write():
    dk_ref[...] = (dk_scratch[...] * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _kernel_layout(q, k, v, q_segment_ids, kv_segment_ids, block_sizes):
  """Pads to the blocks and moves heads before sequence; segment ids replicated."""
  batch = q.shape[0]
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    kv_segment_ids = jnp.zeros(k.shape[:2], jnp.int32)
  q_pad = pl.cdiv(q.shape[1], block_sizes.block_q) * block_sizes.block_q
  kv_pad = pl.cdiv(k.shape[1], block_sizes.block_k) * block_sizes.block_k
  q_segments = pad_axis(q_segment_ids.astype(jnp.int32), q_pad, 1, _QUERY_PAD_SEGMENT)
  k_segments = pad_axis(kv_segment_ids.astype(jnp.int32), kv_pad, 1, _KEY_PAD_SEGMENT)
  return (pad_axis(q, q_pad, 1).transpose(0, 2, 1, 3), pad_axis(k, kv_pad, 1).transpose(0, 2, 1, 3),
          pad_axis(v, kv_pad, 1).transpose(0, 2, 1, 3),
          jnp.broadcast_to(q_segments[:, :, None], (batch, q_pad, _LANES)),
          jnp.broadcast_to(k_segments[:, None, :], (batch, _SUBLANES, kv_pad)))


def _rows(x_bnt, length):
  """[B, N, T] per-row values -> padded and lane-replicated [B, N, T_pad, 128]."""
  x_bnt = pad_axis(x_bnt.astype(jnp.float32), length, 2)
  return jnp.broadcast_to(x_bnt[..., None], (*x_bnt.shape, _LANES))


def _tiles(causal, window, block_sizes, q_pad, kv_pad):
  return _Tiles(causal, window, block_sizes.block_q, block_sizes.block_k,
                q_pad // block_sizes.block_q, kv_pad // block_sizes.block_k)


def forward(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, sm_scale: float,
            block_sizes: BlockSizes = BlockSizes(), interpret: bool = False,
            window: int | None = None):
  """q [B, T, N, H], k/v [B, S, K, H], int segment ids [B, T], [B, S] ->
  (out [B, T, N, H], lse [B, N, T] float32)."""
  batch, q_len, num_heads, head_dim = q.shape
  groups = num_heads // k.shape[2]
  block_q, block_k = block_sizes.block_q, block_sizes.block_k
  q_bnth, k_bksh, v_bksh, q_segments, k_segments = _kernel_layout(
      q, k, v, q_segment_ids, kv_segment_ids, block_sizes)
  q_pad, kv_pad = q_bnth.shape[2], k_bksh.shape[2]
  tiles = _tiles(causal, window, block_sizes, q_pad, kv_pad)
  key = lambda i, j: tiles.fetched(j, tiles.key_blocks(i))

  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, sm_scale=sm_scale, tiles=tiles),
      grid=(batch, num_heads, q_pad // block_q, kv_pad // block_k),
      in_specs=[
          pl.BlockSpec((None, None, block_q, head_dim), lambda b, n, i, j: (b, n, i, 0)),
          pl.BlockSpec((None, None, block_k, head_dim),
                       lambda b, n, i, j: (b, lax.div(n, groups), key(i, j), 0)),
          pl.BlockSpec((None, None, block_k, head_dim),
                       lambda b, n, i, j: (b, lax.div(n, groups), key(i, j), 0)),
          pl.BlockSpec((None, block_q, _LANES), lambda b, n, i, j: (b, i, 0)),
          pl.BlockSpec((None, _SUBLANES, block_k), lambda b, n, i, j: (b, 0, key(i, j))),
      ],
      out_specs=[
          pl.BlockSpec((None, None, block_q, head_dim), lambda b, n, i, j: (b, n, i, 0)),
          pl.BlockSpec((None, None, block_q, _LANES), lambda b, n, i, j: (b, n, i, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q_bnth.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, q_pad, _LANES), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((block_q, _LANES), jnp.float32),
                      pltpu.VMEM((block_q, _LANES), jnp.float32),
                      pltpu.VMEM((block_q, head_dim), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='flash_attention_forward_tpu',
  )(q_bnth, k_bksh, v_bksh, q_segments, k_segments)
  return out.transpose(0, 2, 1, 3)[:, :q_len], lse[:, :, :q_len, 0]


def backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, causal: bool,
             sm_scale: float, block_sizes: BlockSizes = BlockSizes(), interpret: bool = False,
             window: int | None = None):
  """Gradients (dq, dk, dv) of forward's inputs, from its output and lse [B, N, T]."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  groups = num_heads // num_kv_heads
  block_q, block_k = block_sizes.block_q, block_sizes.block_k
  q_bnth, k_bksh, v_bksh, q_segments, k_segments = _kernel_layout(
      q, k, v, q_segment_ids, kv_segment_ids, block_sizes)
  q_pad, kv_pad = q_bnth.shape[2], k_bksh.shape[2]
  do_bnth = pad_axis(d_out, q_pad, 1).transpose(0, 2, 1, 3)
  # delta_i = sum_h dO_ih O_ih: the row term of the softmax gradient.
  delta = jnp.einsum('btnh,btnh->bnt', d_out.astype(jnp.float32), out.astype(jnp.float32))
  lse_rows, delta_rows = _rows(lse, q_pad), _rows(delta, q_pad)
  tiles = _tiles(causal, window, block_sizes, q_pad, kv_pad)
  kernel_kwargs = dict(sm_scale=sm_scale, tiles=tiles)

  key = lambda i, j: tiles.fetched(j, tiles.key_blocks(i))
  q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, n, i, j: (b, n, i, 0))
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim),
                         lambda b, n, i, j: (b, lax.div(n, groups), key(i, j), 0))
  row_spec = pl.BlockSpec((None, None, block_q, _LANES), lambda b, n, i, j: (b, n, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **kernel_kwargs),
      grid=(batch, num_heads, q_pad // block_q, kv_pad // block_k),
      in_specs=[q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, block_q, _LANES), lambda b, n, i, j: (b, i, 0)),
                pl.BlockSpec((None, _SUBLANES, block_k), lambda b, n, i, j: (b, 0, key(i, j))),
                q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q_bnth.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='flash_attention_dq_tpu',
  )(q_bnth, k_bksh, v_bksh, q_segments, k_segments, do_bnth, lse_rows, delta_rows)

  # Grid (b, kv head k, key block j, group member g, query block i): query head k*groups+g.
  query = lambda j, i: tiles.fetched(i, tiles.query_blocks(j))
  q_spec = pl.BlockSpec((None, None, block_q, head_dim),
                        lambda b, k, j, g, i: (b, k * groups + g, query(j, i), 0))
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, k, j, g, i: (b, k, j, 0))
  row_spec = pl.BlockSpec((None, None, block_q, _LANES),
                          lambda b, k, j, g, i: (b, k * groups + g, query(j, i), 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **kernel_kwargs),
      grid=(batch, num_kv_heads, kv_pad // block_k, groups, q_pad // block_q),
      in_specs=[q_spec, kv_spec, kv_spec,
                pl.BlockSpec((None, block_q, _LANES), lambda b, k, j, g, i: (b, query(j, i), 0)),
                pl.BlockSpec((None, _SUBLANES, block_k), lambda b, k, j, g, i: (b, 0, j)),
                q_spec, row_spec, row_spec],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k_bksh.shape, k.dtype),
                 jax.ShapeDtypeStruct(v_bksh.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32),
                      pltpu.VMEM((block_k, head_dim), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary')),
      interpret=interpret,
      name='flash_attention_dkv_tpu',
  )(q_bnth, k_bksh, v_bksh, q_segments, k_segments, do_bnth, lse_rows, delta_rows)

  unlayout = lambda x, length: x.transpose(0, 2, 1, 3)[:, :length]
  return unlayout(dq, q_len), unlayout(dk, kv_len), unlayout(dv, kv_len)
