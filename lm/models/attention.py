"""Attention implementations behind one switch (`config.model.attention`).

Each takes q [B, T, N, H], k and v [B, S, K, H] with K dividing N (grouped-query
attention), segment ids [B, T] (0 = padding) and a sliding window W (0: none); tokens
attend only to earlier or equal positions of their own segment and, with a window, to
the W - 1 positions before their own at most (Mistral's `kv_idx > q_idx - W`; within a
segment index differences are position differences). Returns [B, T, N, H].
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm import sharding
from pallas_kernels.decode_attention import api as decode_attention
from pallas_kernels.flash_attention import api as flash_attention
from pallas_kernels.paged_attention import api as paged_attention


def causal_window_mask(query_index, key_index, window: int):
  """Boolean, broadcast from the two index arrays: the key is not after the query and,
  with a window, less than `window` before it."""
  mask = key_index <= query_index
  if window:
    mask &= key_index > query_index - window
  return mask


def segment_causal_mask(segment_ids_bt, window: int = 0):
  """[B, 1, T, T] boolean: same segment, key index <= query index, within the window."""
  index_t = jnp.arange(segment_ids_bt.shape[1])
  causal_tt = causal_window_mask(index_t[:, None], index_t[None, :], window)
  same_segment_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  return (same_segment_btt & causal_tt)[:, None]


def masked_attention(q_btnh, k_bskh, v_bskh, mask_b1ts):
  """Einsum attention under a boolean mask; softmax in float32. Groups query heads
  instead of repeating K/V. Used directly by cached decoding."""
  batch, length, num_heads, head_dim = q_btnh.shape
  num_kv_heads = k_bskh.shape[2]
  groups = num_heads // num_kv_heads
  q_btkgh = q_btnh.reshape(batch, length, num_kv_heads, groups, head_dim)
  logits_bkgts = jnp.einsum('btkgh,bskh->bkgts', q_btkgh, k_bskh,
                            preferred_element_type=jnp.float32)
  logits_bkgts *= head_dim ** -0.5
  logits_bkgts = jnp.where(mask_b1ts[:, :, None], logits_bkgts, jnp.finfo(jnp.float32).min)
  probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(v_bskh.dtype)
  out_btkgh = jnp.einsum('bkgts,bskh->btkgh', probs_bkgts, v_bskh)
  return out_btkgh.reshape(batch, length, num_heads, head_dim)


def xla_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, window: int = 0):
  return masked_attention(q_btnh, k_bskh, v_bskh, segment_causal_mask(segment_ids_bt, window))


def cudnn_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, window: int = 0):
  """cuDNN fused attention through jax.nn.dot_product_attention (GPU, bf16/fp16 only).

  cuDNN applies causality and the window itself and skips the masked blocks; the
  same-segment mask reaches it as an additive [B, 1, T, T] bias, the one S x S tensor
  this path keeps.
  """
  same_segment_b1ts = (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
      q_btnh, k_bskh, v_bskh, mask=same_segment_b1ts, is_causal=True,
      local_window_size=(window - 1, 0) if window else None, implementation='cudnn')


def pallas_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, window: int = 0):
  """Our Pallas flash attention (pallas_kernels/flash_attention): the kernel for the
  backend, or the reference where there is none (with a log line). Each device runs it
  on its own rows and heads."""
  heads = P('act_batch', 'act_seq', 'act_heads', 'act_head_dim')
  kv_heads = P('act_batch', 'act_seq', 'act_kv_heads', 'act_head_dim')
  attend = lambda q, k, v, ids: flash_attention.flash_attention(
      q, k, v, ids, ids, causal=True, window=window or None)
  return sharding.per_shard(attend, (heads, kv_heads, kv_heads, P('act_batch', 'act_seq')),
                            heads)(q_btnh, k_bskh, v_bskh, segment_ids_bt)


def pallas_decode_attention(q_bnh, k_bkh, v_bkh, k_cache_bskh, v_cache_bskh, start_b,
                            window: int = 0):
  """One cached decoding step (pallas_kernels/decode_attention): writes the new key and
  value at each row's slot `start_b` and attends over the slots up to it (the last
  `window` of them with a window). Returns out [B, N, H] and both caches."""
  heads = P('act_batch', 'act_heads', 'act_head_dim')
  kv_heads = P('act_batch', 'act_kv_heads', 'act_head_dim')
  cache = P('act_batch', None, 'act_kv_heads', 'act_head_dim')
  attend = lambda *args: decode_attention.decode_attention(*args, window=window or None)
  return sharding.per_shard(attend,
                            (heads, kv_heads, kv_heads, cache, cache, P('act_batch')),
                            (heads, cache, cache))(
                                q_bnh, k_bkh, v_bkh, k_cache_bskh, v_cache_bskh, start_b)


def pallas_paged_attention(q_bnh, k_pages_pskh, v_pages_pskh, table_bm, lengths_b,
                           window: int = 0):
  """One decoding step over a paged cache (pallas_kernels/paged_attention), the new keys
  and values already written: row b attends to its first lengths_b[b] slots. The pages
  are every row's, so each device holds them whole and runs its own rows."""
  heads = P('act_batch', 'act_heads', 'act_head_dim')
  pages = P(None, None, 'act_kv_heads', 'act_head_dim')
  attend = lambda *args: paged_attention.paged_attention(*args, window=window or None)
  return sharding.per_shard(attend, (heads, pages, pages, P('act_batch', None), P('act_batch')),
                            heads)(q_bnh, k_pages_pskh, v_pages_pskh, table_bm, lengths_b)


ATTENTION_IMPLEMENTATIONS = {
    'xla': xla_attention,
    'cudnn': cudnn_attention,
    'pallas': pallas_attention,
}
