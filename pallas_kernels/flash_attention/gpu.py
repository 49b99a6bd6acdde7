"""Flash attention for GPUs in Pallas (Triton lowering), forward and backward.

Dimension letters as in lm/__init__.py: B, T, S, N, K, H.

Algorithm (FlashAttention-2, Dao 2023). Forward: one program per (query block, batch,
query head) keeps its [block_q, H] queries on chip and streams the key/value blocks of
its kv head (query head n reads kv head n // groups, so K/V are never repeated),
keeping a running max m, normaliser l and float32 accumulator; it writes O and the
row log-sum-exp (lse). Causal programs stop at the diagonal, and only tiles that cross
it build a causal mask; with a sliding window they also start at the first key block in
the window of the block's first query, and only tiles that cross the window's edge build
its mask (so a query block's work is O(window), not O(S)). The segment mask is built
only when segment ids were given or padding was added. Softmax runs in base 2 (log2 e
folded into the scale, exp2).
Backward recomputes probabilities from Q, K and lse (no T x S tensor anywhere):
  dq program per (query block, batch, head): loops over key blocks;
  dk/dv program per (key block, batch, kv head): loops over its group's query heads
  and the query blocks at or after the diagonal (and, with a window, before the last
  query whose window reaches the block), so no atomics are needed.
Memory traffic, forward: Q, O read/written once; K, V read once per query block.

Each of the three kernels has its own tiling (BlockSizes.forward, .dq, .dkv).
Padding: sequences are padded to the largest block size with segment ids that never match
(padded keys are masked for every query; padded query rows are sliced off).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.padding import pad_axis
from pallas_kernels.flash_attention.reference import MASK_VALUE

_QUERY_PAD_SEGMENT, _KEY_PAD_SEGMENT = -1, -2
LOG2_E = math.log2(math.e)  # exp(x) = exp2(x log2 e); the decode kernel uses it too.


@dataclasses.dataclass(frozen=True)
class Tile:
  """One kernel's tiling: its [block_q, block_k] tile, warps, software-pipeline stages."""
  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ('block_q', 'block_k'):
      value = getattr(self, name)
      if value < 16 or value & (value - 1):
        raise ValueError(f'{name}={value} must be a power of two, at least 16')


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Each kernel tiled on its own: dq streams keys past a query block, dkv queries past
  a key block, so each wants the held side large and the streamed side small."""
  # Defaults: the fastest tiling per kernel on the H100, causal bf16 at head dim 128
  # (docs/benchmarks.md).
  forward: Tile = Tile(block_q=128, block_k=128, num_warps=8, num_stages=2)
  dq: Tile = Tile()
  dkv: Tile = Tile()

  @classmethod
  def uniform(cls, **tile):
    return cls(Tile(**tile), Tile(**tile), Tile(**tile))

  def padding(self) -> tuple[int, int]:
    """Multiples the query and key lengths are padded to: every kernel's blocks divide
    them (powers of two, so the largest)."""
    tiles = (self.forward, self.dq, self.dkv)
    return max(t.block_q for t in tiles), max(t.block_k for t in tiles)


def unsupported(q, k) -> str | None:
  """Why Triton cannot take these shapes (its blocks are powers of two), or None."""
  return unsupported_heads(q.shape[-1], q.shape[2] // k.shape[2])


def unsupported_heads(head_dim: int, groups: int) -> str | None:
  """The head dim and query heads per kv head the Triton kernels take, or why not."""
  if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
    return f'{head_dim=} is not a power of two in [16, 256]'
  if groups & (groups - 1):
    return f'query heads per kv head ({groups}) is not a power of two'
  return None


def _logits(q, k, q_segments, k_segments, q_start, k_start, *, scale, causal, window):
  """Scaled q k^T of one [block_q, block_k] tile in float32, in base 2 (scale holds
  log2(e), so exp2 gives the softmax numerators), masked by segment (when segment rows
  are given), causally if `causal` (tiles that cross the diagonal) and to the sliding
  window if `window` is not None (tiles that cross its edge)."""
  s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale
  mask = None if q_segments is None else q_segments[:, None] == k_segments[None, :]
  if causal or window is not None:
    q_index = q_start + jnp.arange(q.shape[0])
    k_index = k_start + jnp.arange(k.shape[0])
    behind = q_index[:, None] - k_index[None, :]  # How far the key is before the query.
    visible = behind >= 0 if causal else None
    if window is not None:
      visible = behind < window if visible is None else visible & (behind < window)
    mask = visible if mask is None else mask & visible
  return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _ceil_div(x, y):
  return lax.div(x + y - 1, y)


def _loop_over_keys(body, carry, q_start, block_q, block_k, kv_len, causal, window):
  """body(j, carry, masked) over the key blocks a query block sees, in three runs: those
  crossing the window's edge (masked), those every query sees whole (unmasked), those up
  to the diagonal (masked). Without a window the first run is empty; key blocks before
  it, wholly out of every query's window, are skipped."""
  end = unmasked = kv_len // block_k
  first = window_end = 0
  if causal:
    end = jnp.minimum(_ceil_div(q_start + block_q, block_k), end)
    unmasked = lax.div(q_start, block_k)
  if window is not None:
    # The block's first query sees back to index q_start - window + 1; its last query
    # sees every key from q_start + block_q - window on.
    first = lax.div(jnp.maximum(q_start - window + 1, 0), block_k)
    window_end = _ceil_div(jnp.maximum(q_start + block_q - window, 0), block_k)
    window_end = jnp.clip(window_end, first, end)
    unmasked = jnp.clip(unmasked, window_end, end)
  carry = lax.fori_loop(first, window_end, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(window_end, unmasked, functools.partial(body, masked=False), carry)
  return lax.fori_loop(unmasked, end, functools.partial(body, masked=causal), carry)


def _forward_kernel(q_ref, k_ref, v_ref, q_segment_ref, k_segment_ref, o_ref, lse_ref, *,
                    scale, causal, window, segments, block_k):
  block_q, head_dim = q_ref.shape
  q_start = pl.program_id(0) * block_q
  q = q_ref[...]
  q_segments = q_segment_ref[...] if segments else None

  def body(j, carry, masked):
    acc, m, l = carry
    keys = pl.ds(j * block_k, block_k)
    s = _logits(q, k_ref[keys, :], q_segments, k_segment_ref[keys] if segments else None,
                q_start, j * block_k, scale=scale, causal=masked and causal,
                window=window if masked else None)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    correction = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = l * correction + jnp.sum(p, axis=1)
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
    return acc, m_new, l

  carry = (jnp.zeros((block_q, head_dim), jnp.float32),
           jnp.full((block_q,), MASK_VALUE, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = _loop_over_keys(body, carry, q_start, block_q, block_k, k_ref.shape[0], causal,
                              window)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)  # Base 2, for the backward's exp2.


def _dq_kernel(q_ref, k_ref, v_ref, q_segment_ref, k_segment_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, scale, sm_scale, causal, window, segments, block_k):
  block_q, head_dim = q_ref.shape
  q_start = pl.program_id(0) * block_q
  q, do = q_ref[...], do_ref[...]
  q_segments = q_segment_ref[...] if segments else None
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, dq, masked):
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = _logits(q, k, q_segments, k_segment_ref[keys] if segments else None, q_start,
                j * block_k, scale=scale, causal=masked and causal,
                window=window if masked else None)
    p = jnp.exp2(s - lse[:, None])
    dp = plgpu.dot(do, v, trans_b=True).astype(jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k).astype(jnp.float32)

  dq = _loop_over_keys(body, jnp.zeros((block_q, head_dim), jnp.float32), q_start, block_q,
                       block_k, k_ref.shape[0], causal, window)
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_segment_ref, k_segment_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, scale, sm_scale, causal, window, segments, block_q,
                groups):
  block_k, head_dim = k_ref.shape
  num_q_blocks = q_ref.shape[0] // block_q
  k_start = pl.program_id(0) * block_k
  k, v = k_ref[...], v_ref[...]
  k_segments = k_segment_ref[...] if segments else None

  def body(i, carry, group, masked):
    dk, dv = carry
    queries = pl.ds(i * block_q, block_q)
    q, do = q_ref[queries, group, :], do_ref[queries, group, :]
    lse, delta = lse_ref[group, queries], delta_ref[group, queries]
    s = _logits(q, k, q_segment_ref[queries] if segments else None, k_segments, i * block_q,
                k_start, scale=scale, causal=masked and causal,
                window=window if masked else None)
    p = jnp.exp2(s - lse[:, None])  # [block_q, block_k]
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
    dp = plgpu.dot(do, v, trans_b=True).astype(jnp.float32)
    ds = p * (dp - delta[:, None])
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32)
    return dk, dv

  # Causal: query blocks before this key block see none of it; those from `unmasked` on
  # see all of it. Window: those from `window_start` on have queries whose window ends
  # before the block's last key (masked); those from `end` on see none of it.
  first, unmasked, window_start, end = 0, 0, num_q_blocks, num_q_blocks
  if causal:
    first = lax.div(k_start, block_q)
    unmasked = jnp.minimum(_ceil_div(k_start + block_k, block_q), num_q_blocks)
  if window is not None:
    end = jnp.minimum(_ceil_div(k_start + block_k + window - 1, block_q), num_q_blocks)
    unmasked = jnp.minimum(unmasked, end)
    window_start = jnp.clip(lax.div(k_start + window, block_q), unmasked, end)
  carry = (jnp.zeros((block_k, head_dim), jnp.float32),) * 2
  for group in range(groups):  # Static: the query heads that read this kv head.
    for start, stop, masked in ((first, unmasked, causal), (unmasked, window_start, False),
                                (window_start, end, True)):
      carry = lax.fori_loop(start, stop,
                            functools.partial(body, group=group, masked=masked), carry)
  dk, dv = carry
  dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _padded_inputs(q, k, v, q_segment_ids, kv_segment_ids, block_sizes):
  """Inputs padded to the block multiples, and whether the kernels must compare segment
  ids: when the caller gave them, or when padding added keys that must be masked."""
  batch, q_len, _, _ = q.shape
  kv_len = k.shape[1]
  q_multiple, kv_multiple = block_sizes.padding()
  q_pad = pl.cdiv(q_len, q_multiple) * q_multiple
  kv_pad = pl.cdiv(kv_len, kv_multiple) * kv_multiple
  segments = q_segment_ids is not None or q_pad != q_len or kv_pad != kv_len
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros((batch, q_len), jnp.int32)
    kv_segment_ids = jnp.zeros((batch, kv_len), jnp.int32)
  return (pad_axis(q, q_pad, 1), pad_axis(k, kv_pad, 1), pad_axis(v, kv_pad, 1),
          pad_axis(q_segment_ids.astype(jnp.int32), q_pad, 1, _QUERY_PAD_SEGMENT),
          pad_axis(kv_segment_ids.astype(jnp.int32), kv_pad, 1, _KEY_PAD_SEGMENT)), segments


def _query_block_specs(block_q, kv_pad, head_dim, groups):
  """Specs for grid (query block i, batch b, query head n): this block's queries, all of
  the kv head's keys and values, and both segment-id rows."""
  return [
      pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
      pl.BlockSpec((None, kv_pad, None, head_dim), lambda i, b, n: (b, 0, n // groups, 0)),
      pl.BlockSpec((None, kv_pad, None, head_dim), lambda i, b, n: (b, 0, n // groups, 0)),
      pl.BlockSpec((None, block_q), lambda i, b, n: (b, i)),
      pl.BlockSpec((None, kv_pad), lambda i, b, n: (b, 0)),
  ]


def _params(tile):
  return plgpu.CompilerParams(num_warps=tile.num_warps, num_stages=tile.num_stages)


def forward(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, sm_scale: float,
            block_sizes: BlockSizes, interpret: bool, window: int | None = None):
  """Returns out [B, T, N, H] and lse [B, N, T_padded] (float32, base 2)."""
  batch, q_len, num_heads, head_dim = q.shape
  groups = num_heads // k.shape[2]
  padded, segments = _padded_inputs(q, k, v, q_segment_ids, kv_segment_ids, block_sizes)
  q_p, k_p = padded[:2]
  q_pad, kv_pad = q_p.shape[1], k_p.shape[1]
  tile = block_sizes.forward
  block_q = tile.block_q
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, scale=sm_scale * LOG2_E, causal=causal,
                        window=window, segments=segments, block_k=tile.block_k),
      grid=(q_pad // block_q, batch, num_heads),
      in_specs=_query_block_specs(block_q, kv_pad, head_dim, groups),
      out_specs=[
          pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
          pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q_p.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, q_pad), jnp.float32)],
      compiler_params=_params(tile),
      interpret=interpret,
      name='flash_attention_forward',
  )(*padded)
  return out[:, :q_len], lse


def backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, causal: bool,
             sm_scale: float, block_sizes: BlockSizes, interpret: bool,
             window: int | None = None):
  """Gradients (dq, dk, dv) of the forward's inputs."""
  padded, segments = _padded_inputs(q, k, v, q_segment_ids, kv_segment_ids, block_sizes)
  q_p, k_p, v_p = padded[:3]
  kv_len = k.shape[1]
  batch, q_pad, num_heads, head_dim = q_p.shape
  q_len = out.shape[1]
  kv_pad, num_kv_heads = k_p.shape[1], k_p.shape[2]
  groups = num_heads // num_kv_heads
  do_p = pad_axis(d_out, q_pad, 1)
  # delta_i = sum_h dO_ih O_ih: the row term of the softmax gradient.
  delta = jnp.einsum('btnh,btnh->bnt', d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta = pad_axis(delta, q_pad, 2)
  kernel_kwargs = dict(scale=sm_scale * LOG2_E, sm_scale=sm_scale, causal=causal,
                       window=window, segments=segments)

  tile = block_sizes.dq
  block_q = tile.block_q
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=tile.block_k, **kernel_kwargs),
      grid=(q_pad // block_q, batch, num_heads),
      in_specs=_query_block_specs(block_q, kv_pad, head_dim, groups) + [
          pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
          pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i)),
          pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i)),
      ],
      out_specs=pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
      out_shape=jax.ShapeDtypeStruct(q_p.shape, q_p.dtype),
      compiler_params=_params(tile),
      interpret=interpret,
      name='flash_attention_dq',
  )(*padded, do_p, lse, delta)

  tile = block_sizes.dkv
  block_k = tile.block_k
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=tile.block_q, groups=groups, **kernel_kwargs),
      grid=(kv_pad // block_k, batch, num_kv_heads),
      in_specs=[
          pl.BlockSpec((None, q_pad, groups, head_dim), lambda j, b, k: (b, 0, k, 0)),
          pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, k: (b, j, k, 0)),
          pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, k: (b, j, k, 0)),
          pl.BlockSpec((None, q_pad), lambda j, b, k: (b, 0)),
          pl.BlockSpec((None, block_k), lambda j, b, k: (b, j)),
          pl.BlockSpec((None, q_pad, groups, head_dim), lambda j, b, k: (b, 0, k, 0)),
          pl.BlockSpec((None, groups, q_pad), lambda j, b, k: (b, k, 0)),
          pl.BlockSpec((None, groups, q_pad), lambda j, b, k: (b, k, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, k: (b, j, k, 0)),
          pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, k: (b, j, k, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct(k_p.shape, k_p.dtype),
                 jax.ShapeDtypeStruct(v_p.shape, v_p.dtype)],
      compiler_params=_params(tile),
      interpret=interpret,
      name='flash_attention_dkv',
  )(*padded, do_p, lse, delta)
  return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]
