"""One decoding step of attention over a paged KV cache, in plain JAX: the specification
the paged-attention kernels are tested against.

Dimension letters as in lm/__init__.py (B, N, K, G, H; K divides N and query head n reads
kv head n // G, G = N / K), and for the pages, in this package only: P pages in the pool,
S slots per page (the page size), M pages in each row's page table.

The cache is a pool of pages [P, S, K, H] shared by all rows. Row b's logical slot s lives
in page page_table[b, s // S] at offset s % S. The row's new token has already been
written to its slot, lengths[b] - 1, and its query attends to slots 0 .. lengths[b] - 1,
or with a sliding window only to the last `window` of them,
lengths[b] - 1 - window < s <= lengths[b] - 1 (decode_attention's window, for the token
at slot lengths[b] - 1). What the unseen slots hold (stale entries, NaN) does not matter,
and table entries past a row's length are never used. A row of length 0 (an idle slot of
the batch) attends to nothing: its output is zeros. Softmax is float32.
"""

import jax.numpy as jnp

from pallas_kernels.flash_attention.reference import MASK_VALUE, check_window


def check_shapes(q_bnh, k_pages_pskh, v_pages_pskh, page_table_bm, lengths_b) -> None:
  """Raises with a message that names what does not fit."""
  batch, num_heads, head_dim = q_bnh.shape
  if k_pages_pskh.ndim != 4 or k_pages_pskh.shape != v_pages_pskh.shape:
    raise ValueError(f'k_pages {k_pages_pskh.shape} and v_pages {v_pages_pskh.shape} must '
                     'both be [pages, page_size, kv_heads, head_dim]')
  num_kv_heads = k_pages_pskh.shape[2]
  if k_pages_pskh.shape[3] != head_dim:
    raise ValueError(f'the pages\' head dim {k_pages_pskh.shape[3]} is not q\'s {head_dim}')
  if num_heads % num_kv_heads:
    raise ValueError(f'query heads {num_heads} are not a multiple of kv heads {num_kv_heads}')
  if page_table_bm.ndim != 2 or page_table_bm.shape[0] != batch:
    raise ValueError(f'page_table {page_table_bm.shape} must be [batch={batch}, pages per row]')
  if lengths_b.shape != (batch,):
    raise ValueError(f'lengths {lengths_b.shape} must be [batch={batch}]')


def seen_slots(lengths_b, num_slots: int, window: int | None):
  """[B, num_slots] bool: which logical slots each row's query attends to."""
  behind_bs = lengths_b[:, None] - 1 - jnp.arange(num_slots)[None, :]  # Slots before the token.
  seen_bs = behind_bs >= 0
  if window is not None:
    seen_bs &= behind_bs < window
  return seen_bs


def paged_attention(q_bnh, k_pages_pskh, v_pages_pskh, page_table_bm, lengths_b, *,
                    sm_scale: float | None = None, window: int | None = None):
  """Returns out [B, N, H] in q's dtype."""
  check_shapes(q_bnh, k_pages_pskh, v_pages_pskh, page_table_bm, lengths_b)
  check_window(window)
  batch, num_heads, head_dim = q_bnh.shape
  page_size, num_kv_heads = k_pages_pskh.shape[1:3]
  sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  num_slots = page_table_bm.shape[1] * page_size
  # Each row's pages in table order: its logical slots, contiguous. [B, M * S, K, H]
  k_bskh = k_pages_pskh[page_table_bm].reshape(batch, num_slots, num_kv_heads, head_dim)
  v_bskh = v_pages_pskh[page_table_bm].reshape(batch, num_slots, num_kv_heads, head_dim)
  seen_bs = seen_slots(lengths_b, num_slots, window)
  # Unseen slots may hold anything, NaN included: zero them so that 0 * NaN cannot reach
  # the output through the weighted sum.
  v_bskh = jnp.where(seen_bs[:, :, None, None], v_bskh.astype(jnp.float32), 0.0)
  q_bkgh = q_bnh.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits_bkgs = jnp.einsum('bkgh,bskh->bkgs', q_bkgh.astype(jnp.float32),
                           k_bskh.astype(jnp.float32)) * sm_scale
  logits_bkgs = jnp.where(seen_bs[:, None, None], logits_bkgs, MASK_VALUE)
  probs_bkgs = jnp.exp(logits_bkgs - logits_bkgs.max(-1, keepdims=True))
  probs_bkgs /= probs_bkgs.sum(-1, keepdims=True)
  out_bkgh = jnp.einsum('bkgs,bskh->bkgh', probs_bkgs, v_bskh)
  # A row of length 0 sees no slot: its softmax above is uniform over masked slots (whose
  # values are zeroed), so its output is already 0; keep that explicit.
  out_bkgh = jnp.where((lengths_b > 0)[:, None, None, None], out_bkgh, 0.0)
  return out_bkgh.reshape(batch, num_heads, head_dim).astype(q_bnh.dtype)
