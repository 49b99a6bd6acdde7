"""One decoding step of attention over a KV cache, in plain JAX: the specification the
decode kernels are tested against.

Dimension letters as in lm/__init__.py: B, S (cache slots), N, K, G, H (K divides N; query
head n reads kv head n // G, G = N / K).

Row b's new token goes to slot start[b] (which must be inside the cache, start[b] < S);
its query attends to slots 0 .. start[b] (the cache so far and itself), or with a sliding
window only to the `window` slots ending there, start[b] - window < s <= start[b] (as the
flash-attention reference's window, for the query at index start[b]). Softmax is
float32.
"""

import jax.numpy as jnp

from pallas_kernels.flash_attention.reference import MASK_VALUE, check_window


def write(cache_bskh, new_bkh, start_b):
  """The cache with row b's new entry at slot start[b]."""
  return cache_bskh.at[jnp.arange(cache_bskh.shape[0]), start_b].set(
      new_bkh.astype(cache_bskh.dtype))


def decode_attention(q_bnh, k_bkh, v_bkh, k_cache_bskh, v_cache_bskh, start_b, *,
                     sm_scale: float | None = None, window: int | None = None):
  """Returns out [B, N, H] (q's dtype) and both caches with the new token written."""
  check_window(window)
  batch, num_heads, head_dim = q_bnh.shape
  slots, num_kv_heads = k_cache_bskh.shape[1:3]
  sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  k_cache_bskh = write(k_cache_bskh, k_bkh, start_b)
  v_cache_bskh = write(v_cache_bskh, v_bkh, start_b)
  q_bkgh = q_bnh.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits_bkgs = jnp.einsum('bkgh,bskh->bkgs', q_bkgh.astype(jnp.float32),
                           k_cache_bskh.astype(jnp.float32)) * sm_scale
  behind_bs = start_b[:, None] - jnp.arange(slots)[None, :]  # How far before the new token.
  seen_bs = behind_bs >= 0
  if window is not None:
    seen_bs &= behind_bs < window
  logits_bkgs = jnp.where(seen_bs[:, None, None], logits_bkgs, MASK_VALUE)
  probs_bkgs = jnp.exp(logits_bkgs - logits_bkgs.max(-1, keepdims=True))
  probs_bkgs /= probs_bkgs.sum(-1, keepdims=True)
  out_bkgh = jnp.einsum('bkgs,bskh->bkgh', probs_bkgs, v_cache_bskh.astype(jnp.float32))
  return (out_bkgh.reshape(batch, num_heads, head_dim).astype(q_bnh.dtype), k_cache_bskh,
          v_cache_bskh)
