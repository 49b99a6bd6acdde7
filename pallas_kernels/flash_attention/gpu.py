"""Flash attention for GPUs in Pallas (Triton lowering), forward and backward.

Algorithm (FlashAttention-2, Dao 2023). Forward: one program per (query block, batch,
query head) keeps its [block_q, H] queries on chip and streams the key/value blocks of
its kv head (query head n reads kv head n // groups, so K/V are never repeated),
keeping a running max m, normaliser l and float32 accumulator; it writes O and the
row log-sum-exp (lse). Causal programs stop at the diagonal.
Backward recomputes probabilities from Q, K and lse (no T x S tensor anywhere):
  dq program per (query block, batch, head): loops over key blocks;
  dk/dv program per (key block, batch, kv head): loops over its group's query heads
  and the query blocks at or after the diagonal, so no atomics are needed.
Memory traffic, forward: Q, O read/written once; K, V read once per query block.

Padding: sequences are padded to the block sizes with segment ids that never match
(padded keys are masked for every query; padded query rows are sliced off).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.padding import pad_axis
from pallas_kernels.flash_attention.reference import MASK_VALUE

_QUERY_PAD_SEGMENT, _KEY_PAD_SEGMENT = -1, -2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2


def unsupported(q, k) -> str | None:
  """Why Triton cannot take these shapes (its blocks are powers of two), or None."""
  head_dim, groups = q.shape[-1], q.shape[2] // k.shape[2]
  if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
    return f'{head_dim=} is not a power of two in [16, 256]'
  if groups & (groups - 1):
    return f'query heads per kv head ({groups}) is not a power of two'
  return None


def _logits(q, k, q_segments, k_segments, q_start, k_start, *, sm_scale, causal):
  """Masked, scaled q k^T of one [block_q, block_k] tile, float32."""
  s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * sm_scale
  mask = q_segments[:, None] == k_segments[None, :]
  if causal:
    q_index = q_start + jnp.arange(q.shape[0])
    k_index = k_start + jnp.arange(k.shape[0])
    mask &= q_index[:, None] >= k_index[None, :]
  return jnp.where(mask, s, MASK_VALUE)


def _num_key_blocks(q_block_index, block_q, block_k, kv_len, causal):
  total = kv_len // block_k
  if not causal:
    return total
  return jnp.minimum(lax.div(block_q * (q_block_index + 1) + block_k - 1, block_k), total)


def _forward_kernel(q_ref, k_ref, v_ref, q_segment_ref, k_segment_ref, o_ref, lse_ref, *,
                    sm_scale, causal, block_k):
  block_q, head_dim = q_ref.shape
  kv_len = k_ref.shape[0]
  q_block = pl.program_id(0)
  q = q_ref[...]
  q_segments = q_segment_ref[...]

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(j * block_k, block_k)
    s = _logits(q, k_ref[keys, :], q_segments, k_segment_ref[keys], q_block * block_q,
                j * block_k, sm_scale=sm_scale, causal=causal)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = l * correction + jnp.sum(p, axis=1)
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
    return acc, m_new, l

  initial = (jnp.zeros((block_q, head_dim), jnp.float32),
             jnp.full((block_q,), MASK_VALUE, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(0, _num_key_blocks(q_block, block_q, block_k, kv_len, causal),
                            body, initial)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, q_segment_ref, k_segment_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, sm_scale, causal, block_k):
  block_q, head_dim = q_ref.shape
  kv_len = k_ref.shape[0]
  q_block = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  q_segments, lse, delta = q_segment_ref[...], lse_ref[...], delta_ref[...]

  def body(j, dq):
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = _logits(q, k, q_segments, k_segment_ref[keys], q_block * block_q, j * block_k,
                sm_scale=sm_scale, causal=causal)
    p = jnp.exp(s - lse[:, None])
    dp = plgpu.dot(do, v, trans_b=True).astype(jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k).astype(jnp.float32)

  dq = lax.fori_loop(0, _num_key_blocks(q_block, block_q, block_k, kv_len, causal), body,
                     jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_segment_ref, k_segment_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, sm_scale, causal, block_q, groups):
  block_k, head_dim = k_ref.shape
  q_len = q_ref.shape[0]
  k_block = pl.program_id(0)
  k, v, k_segments = k_ref[...], v_ref[...], k_segment_ref[...]
  # Causal: query blocks before this key block see none of it.
  first_q_block = lax.div(k_block * block_k, block_q) if causal else 0

  def body(i, carry, group):
    dk, dv = carry
    queries = pl.ds(i * block_q, block_q)
    q, do = q_ref[queries, group, :], do_ref[queries, group, :]
    lse, delta = lse_ref[group, queries], delta_ref[group, queries]
    s = _logits(q, k, q_segment_ref[queries], k_segments, i * block_q, k_block * block_k,
                sm_scale=sm_scale, causal=causal)
    p = jnp.exp(s - lse[:, None])  # [block_q, block_k]
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
    dp = plgpu.dot(do, v, trans_b=True).astype(jnp.float32)
    ds = p * (dp - delta[:, None])
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32)
    return dk, dv

  carry = (jnp.zeros((block_k, head_dim), jnp.float32),) * 2
  for group in range(groups):  # Static: the query heads that read this kv head.
    carry = lax.fori_loop(first_q_block, q_len // block_q,
                          functools.partial(body, group=group), carry)
  dk, dv = carry
  dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _padded_inputs(q, k, v, q_segment_ids, kv_segment_ids, block_sizes):
  batch, q_len, _, _ = q.shape
  kv_len = k.shape[1]
  q_pad = pl.cdiv(q_len, block_sizes.block_q) * block_sizes.block_q
  kv_pad = pl.cdiv(kv_len, block_sizes.block_k) * block_sizes.block_k
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros((batch, q_len), jnp.int32)
    kv_segment_ids = jnp.zeros((batch, kv_len), jnp.int32)
  return (pad_axis(q, q_pad, 1), pad_axis(k, kv_pad, 1), pad_axis(v, kv_pad, 1),
          pad_axis(q_segment_ids.astype(jnp.int32), q_pad, 1, _QUERY_PAD_SEGMENT),
          pad_axis(kv_segment_ids.astype(jnp.int32), kv_pad, 1, _KEY_PAD_SEGMENT))


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


def _params(block_sizes):
  return plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                              num_stages=block_sizes.num_stages)


def forward(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, sm_scale: float,
            block_sizes: BlockSizes, interpret: bool):
  """Returns out [B, T, N, H] and lse [B, N, T_padded] (float32)."""
  batch, q_len, num_heads, head_dim = q.shape
  groups = num_heads // k.shape[2]
  padded = _padded_inputs(q, k, v, q_segment_ids, kv_segment_ids, block_sizes)
  q_p, k_p, v_p, q_seg, kv_seg = padded
  q_pad, kv_pad = q_p.shape[1], k_p.shape[1]
  block_q = block_sizes.block_q
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, sm_scale=sm_scale, causal=causal,
                        block_k=block_sizes.block_k),
      grid=(q_pad // block_q, batch, num_heads),
      in_specs=_query_block_specs(block_q, kv_pad, head_dim, groups),
      out_specs=[
          pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
          pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q_p.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, q_pad), jnp.float32)],
      compiler_params=_params(block_sizes),
      interpret=interpret,
      name='flash_attention_forward',
  )(q_p, k_p, v_p, q_seg, kv_seg)
  return out[:, :q_len], lse


def backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, causal: bool,
             sm_scale: float, block_sizes: BlockSizes, interpret: bool):
  """Gradients (dq, dk, dv) of the forward's inputs."""
  q_p, k_p, v_p, q_seg, kv_seg = _padded_inputs(q, k, v, q_segment_ids, kv_segment_ids,
                                                block_sizes)
  kv_len = k.shape[1]
  batch, q_pad, num_heads, head_dim = q_p.shape
  q_len = out.shape[1]
  kv_pad, num_kv_heads = k_p.shape[1], k_p.shape[2]
  groups = num_heads // num_kv_heads
  block_q, block_k = block_sizes.block_q, block_sizes.block_k
  do_p = pad_axis(d_out, q_pad, 1)
  # delta_i = sum_h dO_ih O_ih: the row term of the softmax gradient.
  delta = jnp.einsum('btnh,btnh->bnt', d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta = pad_axis(delta, q_pad, 2)
  kernel_kwargs = dict(sm_scale=sm_scale, causal=causal)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=block_k, **kernel_kwargs),
      grid=(q_pad // block_q, batch, num_heads),
      in_specs=_query_block_specs(block_q, kv_pad, head_dim, groups) + [
          pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
          pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i)),
          pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i)),
      ],
      out_specs=pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, n: (b, i, n, 0)),
      out_shape=jax.ShapeDtypeStruct(q_p.shape, q_p.dtype),
      compiler_params=_params(block_sizes),
      interpret=interpret,
      name='flash_attention_dq',
  )(q_p, k_p, v_p, q_seg, kv_seg, do_p, lse, delta)

  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=block_q, groups=groups, **kernel_kwargs),
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
      compiler_params=_params(block_sizes),
      interpret=interpret,
      name='flash_attention_dkv',
  )(q_p, k_p, v_p, q_seg, kv_seg, do_p, lse, delta)
  return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]
