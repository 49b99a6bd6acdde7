"""The Transformer block: RoPE, RMSNorm, SwiGLU, grouped-query attention.

Dimension letters as in lm/__init__.py.

Takes `segment_ids` and `positions` so a packed row of several documents behaves
exactly like each document on its own: attention is masked to the token's segment
and RoPE uses the position within the document.

Decoding (`decode=True`, with the 'cache' collection mutable): each attention layer
keeps keys and values [B, S, K, H] for S cache slots and each row's filled length
[B]. A call appends its T tokens at every row's own length (so prompts of different
lengths share one static-shape cache) and attends to all filled slots. Padding
tokens (segment id 0) are written but not counted, so the next call overwrites them.
With `attention='pallas'`, a one-token call (a decode step) writes and attends in one
kernel (pallas_kernels/decode_attention) instead of XLA's scatter and einsums.
With `kv_cache_dtype='int8'` the cache holds keys and values as int8 with a float32
scale per slot and head (a quarter of a float32 cache's bytes, plus 4/head_dim), read
back dequantized (for long generations, where the cache outgrows the weights).
`lm.sampling.init_cache` builds an empty cache; Mamba blocks keep their state in the
same collection behind the same call.

Paged decoding (`decode=Pages(...)`, lm/engine): the cache is pages [P, S, K, H] shared by
every row, and row b's token at position p lives in page table[b, p // S], slot p % S.
Each call writes its tokens there (padding to page 0, which no table points at) and
attends over the row's pages up to each query's position: rows join and leave a running
batch, and rows that share a prompt's prefix share its pages (the engine's bookkeeping).
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from lm import sharding
from lm.models import attention as attention_lib
from lm.models import layers

NULL_PAGE = 0  # Padding tokens write here; no row's table holds it below its length.


@flax.struct.dataclass
class Pages:
  """A paged cache's layout for one call: each row's page table [B, M] (page ids), and
  the pages' number and size (static: they shape the cache)."""
  table_bm: jax.Array
  num_pages: int = flax.struct.field(pytree_node=False)
  page_size: int = flax.struct.field(pytree_node=False)


class Attention(nn.Module):
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x_btd, segment_ids_bt, positions_bt, decode: bool = False):
    cfg = self.config
    dense = lambda features, names, name, axis=-1, bias=False: nn.DenseGeneral(
        features, axis=axis, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=layers.dense_init(names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-len(features):]
                                               if isinstance(features, tuple) else names[-1:]),
        name=name)
    q_btnh = dense((cfg.num_heads, cfg.head_dim), ('embed', 'heads', 'head_dim'), 'query',
                   bias=cfg.qkv_bias)(x_btd)
    k_btkh = dense((cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'head_dim'), 'key',
                   bias=cfg.qkv_bias)(x_btd)
    v_btkh = dense((cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'head_dim'), 'value',
                   bias=cfg.qkv_bias)(x_btd)
    if cfg.qk_norm:  # Per-head RMSNorm of queries and keys before RoPE (Qwen3).
      q_btnh = layers.RMSNorm(cfg.norm_eps, cfg.dtype, name='query_norm')(q_btnh)
      k_btkh = layers.RMSNorm(cfg.norm_eps, cfg.dtype, name='key_norm')(k_btkh)
    q_btnh = layers.apply_rope(q_btnh, positions_bt, cfg.rope_theta, cfg.rope_scaling)
    k_btkh = layers.apply_rope(k_btkh, positions_bt, cfg.rope_theta, cfg.rope_scaling)
    q_btnh = sharding.constrain(q_btnh, ('act_batch', 'act_seq', 'act_heads', 'act_head_dim'))
    k_btkh = sharding.constrain(k_btkh, ('act_batch', 'act_seq', 'act_kv_heads', 'act_head_dim'))
    v_btkh = sharding.constrain(v_btkh, ('act_batch', 'act_seq', 'act_kv_heads', 'act_head_dim'))
    if isinstance(decode, Pages):
      out_btnh = self._attend_with_pages(q_btnh, k_btkh, v_btkh, segment_ids_bt, positions_bt,
                                         decode)
    elif decode:
      out_btnh = self._attend_with_cache(q_btnh, k_btkh, v_btkh, segment_ids_bt)
    else:
      attend = attention_lib.ATTENTION_IMPLEMENTATIONS[cfg.attention]
      out_btnh = attend(q_btnh, k_btkh, v_btkh, segment_ids_bt, cfg.sliding_window)
    out_btnh = sharding.constrain(out_btnh, ('act_batch', 'act_seq', 'act_heads', 'act_head_dim'))
    return dense(x_btd.shape[-1], ('heads', 'head_dim', 'embed'), 'out', axis=(-2, -1),
                 bias=cfg.attention_out_bias)(out_btnh)

  def _attend_with_cache(self, q_btnh, k_btkh, v_btkh, segment_ids_bt):
    # At init the variables take this call's shape: init_cache passes [B, S] tokens.
    batch, length, num_kv_heads, head_dim = k_btkh.shape
    int8 = self.config.get('kv_cache_dtype', '') == 'int8'
    shape = (batch, length, num_kv_heads, head_dim)
    key_cache = self.variable('cache', 'cached_key', jnp.zeros, shape,
                              jnp.int8 if int8 else k_btkh.dtype)
    value_cache = self.variable('cache', 'cached_value', jnp.zeros, shape,
                                jnp.int8 if int8 else v_btkh.dtype)
    lengths = self.variable('cache', 'cache_lengths', jnp.zeros, (batch,), jnp.int32)

    start_b = lengths.value
    lengths.value = start_b + jnp.sum(segment_ids_bt != 0, axis=1, dtype=jnp.int32)
    # One token per row, a decode step: the Pallas kernel reads float caches only.
    if length == 1 and self.config.attention == 'pallas' and not int8:
      out_bnh, key_cache.value, value_cache.value = attention_lib.pallas_decode_attention(
          q_btnh[:, 0], k_btkh[:, 0], v_btkh[:, 0], key_cache.value, value_cache.value, start_b,
          self.config.sliding_window)
      return out_bnh[:, None]
    append = jax.vmap(lambda cache, new, start: jax.lax.dynamic_update_slice_in_dim(
        cache, new.astype(cache.dtype), start, axis=0))
    if int8:  # A scale per slot and head; the cache holds round(x / scale) in [-127, 127].
      key_scale = self.variable('cache', 'cached_key_scale', jnp.zeros, shape[:3], jnp.float32)
      value_scale = self.variable('cache', 'cached_value_scale', jnp.zeros, shape[:3],
                                  jnp.float32)
      keys, values = [], []
      for cache, scale, new_btkh, read in ((key_cache, key_scale, k_btkh, keys),
                                           (value_cache, value_scale, v_btkh, values)):
        quantized_btkh, scale_btk = quantize_int8(new_btkh)
        cache.value = append(cache.value, quantized_btkh, start_b)
        scale.value = append(scale.value, scale_btk, start_b)
        read.append((cache.value * scale.value[..., None]).astype(new_btkh.dtype))
      cached_keys, cached_values = keys[0], values[0]
    else:
      key_cache.value = append(key_cache.value, k_btkh, start_b)
      value_cache.value = append(value_cache.value, v_btkh, start_b)
      cached_keys, cached_values = key_cache.value, value_cache.value

    # Query t of row b sits in slot start_b + t and sees every slot up to it (within the
    # window). Slots are positions: a row's cache holds one sequence from slot 0.
    query_slot_bt = start_b[:, None] + jnp.arange(length)[None]
    slots_s = jnp.arange(cached_keys.shape[1])
    mask_b1ts = attention_lib.causal_window_mask(
        query_slot_bt[:, :, None], slots_s[None, None, :], self.config.sliding_window)[:, None]
    return attention_lib.masked_attention(q_btnh, cached_keys, cached_values, mask_b1ts)


  def _attend_with_pages(self, q_btnh, k_btkh, v_btkh, segment_ids_bt, positions_bt, pages):
    page_size = pages.page_size
    shape = (pages.num_pages, page_size) + k_btkh.shape[2:]
    key_pages = self.variable('cache', 'key_pages', jnp.zeros, shape, k_btkh.dtype)
    value_pages = self.variable('cache', 'value_pages', jnp.zeros, shape, v_btkh.dtype)
    real_bt = segment_ids_bt != 0
    positions_bt = jnp.where(real_bt, positions_bt, 0)
    page_bt = jnp.take_along_axis(pages.table_bm, positions_bt // page_size, axis=1)
    page_bt = jnp.where(real_bt, page_bt, NULL_PAGE)
    for cache, new_btkh in ((key_pages, k_btkh), (value_pages, v_btkh)):
      cache.value = cache.value.at[page_bt, positions_bt % page_size].set(
          new_btkh.astype(cache.value.dtype))
    if q_btnh.shape[1] == 1 and self.config.attention == 'pallas':  # A decode step.
      lengths_b = jnp.where(real_bt[:, 0], positions_bt[:, 0] + 1, 0)
      return attention_lib.pallas_paged_attention(
          q_btnh[:, 0], key_pages.value, value_pages.value, pages.table_bm, lengths_b,
          self.config.sliding_window)[:, None]
    # Each row's pages in order: its sequence as one [B, M * S] cache.
    batch, num_table_pages = pages.table_bm.shape
    gather = lambda cache: cache.value.at[pages.table_bm].get(mode="promise_in_bounds").reshape(
        (batch, num_table_pages * page_size) + shape[2:])
    slots_s = jnp.arange(num_table_pages * page_size)
    mask_b1ts = attention_lib.causal_window_mask(
        positions_bt[:, :, None], slots_s[None, None, :], self.config.sliding_window)[:, None]
    return attention_lib.masked_attention(q_btnh, gather(key_pages), gather(value_pages),
                                          mask_b1ts)


def quantize_int8(x_btkh):
  """Symmetric int8 of each vector over its last axis: (round(x / scale), scale), scale =
  max |x| / 127, so |x - q scale| <= scale / 2."""
  x_btkh = x_btkh.astype(jnp.float32)
  scale_btk = jnp.max(jnp.abs(x_btkh), axis=-1) / 127
  safe_btk = jnp.where(scale_btk > 0, scale_btk, 1.0)  # An all-zero vector stays zero.
  quantized = jnp.clip(jnp.round(x_btkh / safe_btk[..., None]), -127, 127)
  return quantized.astype(jnp.int8), scale_btk


class AttentionBlock(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x_btd, segment_ids_bt, positions_bt, decode: bool = False):
    cfg = self.config
    h_btd = layers.RMSNorm(cfg.norm_eps, cfg.dtype, name='attention_norm')(x_btd)
    h_btd = sharding.constrain(h_btd, ('act_batch', 'act_seq', 'act_embed'))
    x_btd = x_btd + Attention(cfg, name='attention')(h_btd, segment_ids_bt, positions_bt, decode)
    h_btd = layers.RMSNorm(cfg.norm_eps, cfg.dtype, name='mlp_norm')(x_btd)
    h_btd = sharding.constrain(h_btd, ('act_batch', 'act_seq', 'act_embed'))
    x_btd = x_btd + layers.MLP(cfg.mlp_dim, cfg.dtype, cfg.param_dtype, name='mlp')(h_btd)
    return sharding.constrain(x_btd, ('act_batch', 'act_seq', 'act_embed'))


def flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token of one block (forward + backward = 3x forward), matmuls
  only: 6 per weight, plus causal attention's scores and values, 2 matmuls of 2*T*N*H
  flops per token, halved for causality, times 3."""
  d, n, k, h, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  weights = d * (n * h + 2 * k * h) + n * h * d + 3 * d * f
  return 6 * weights + 3 * 2 * seq_len * n * h
