"""Attention in plain JAX: the specification the flash-attention kernels are tested against.

Dimension letters as in lm/__init__.py: B, T, S, N, K, H (K divides N; query head n reads
kv head n // G, G = N / K).

A query attends to a key when both have the same segment id and, if causal, the key's
index is not after the query's; with a sliding window (causal only), also only when the key
is fewer than `window` indices before it (Mistral's `q_idx - kv_idx < window`: at most
`window` keys, itself included). Indices count from each row's start; within a packed
document their differences are position differences. Softmax and accumulation are
float32; the log-sum-exp of each query row is what the kernels save for their backward
pass.
"""

import numbers

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # Finite: exp() of it is 0, not NaN.


def check_window(window, *, causal: bool = True) -> None:
  """Raises unless `window` is None or a positive int, given only with a causal mask."""
  if window is None:
    return
  if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
    raise ValueError(f'{window=} must be a positive int or None')
  if not causal:
    raise ValueError(f'{window=} needs causal=True: a sliding window looks back only')


def attention_with_lse(q_btnh, k_bskh, v_bskh, q_segment_ids_bt=None, kv_segment_ids_bs=None,
                       *, causal: bool = True, sm_scale: float | None = None,
                       window: int | None = None):
  """Returns out [B, T, N, H] (dtype of q) and lse [B, N, T] (float32)."""
  check_window(window, causal=causal)
  batch, q_len, num_heads, head_dim = q_btnh.shape
  kv_len, num_kv_heads = k_bskh.shape[1], k_bskh.shape[2]
  groups = num_heads // num_kv_heads
  sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  k_bsnh = jnp.repeat(k_bskh, groups, axis=2)  # Fine for a reference; kernels don't.
  v_bsnh = jnp.repeat(v_bskh, groups, axis=2)
  logits_bnts = jnp.einsum('btnh,bsnh->bnts', q_btnh.astype(jnp.float32),
                           k_bsnh.astype(jnp.float32)) * sm_scale
  mask_bts = jnp.ones((batch, q_len, kv_len), jnp.bool_)
  if q_segment_ids_bt is not None:
    mask_bts &= q_segment_ids_bt[:, :, None] == kv_segment_ids_bs[:, None, :]
  if causal:
    behind_ts = jnp.arange(q_len)[:, None] - jnp.arange(kv_len)[None, :]  # t - s
    mask_bts &= behind_ts >= 0
    if window is not None:
      mask_bts &= behind_ts < window
  logits_bnts = jnp.where(mask_bts[:, None], logits_bnts, MASK_VALUE)
  lse_bnt = jax.nn.logsumexp(logits_bnts, axis=-1)
  probs_bnts = jnp.exp(logits_bnts - lse_bnt[..., None])
  out_btnh = jnp.einsum('bnts,bsnh->btnh', probs_bnts, v_bsnh.astype(jnp.float32))
  return out_btnh.astype(q_btnh.dtype), lse_bnt


def attention(q_btnh, k_bskh, v_bskh, q_segment_ids_bt=None, kv_segment_ids_bs=None, *,
              causal: bool = True, sm_scale: float | None = None, window: int | None = None):
  return attention_with_lse(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs,
                            causal=causal, sm_scale=sm_scale, window=window)[0]
