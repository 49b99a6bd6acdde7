"""Paged attention: one entry point that picks the kernel for the backend.

`paged_attention(q, k_pages, v_pages, page_table, lengths)` takes one new token per row,
q [B, N, H], and a KV cache in pages shared by all rows, k_pages and v_pages [P, S, K, H]
(K divides N), with row b's logical slot s in page page_table[b, s // S] at offset s % S.
The new token's key and value are already in the cache at slot lengths[b] - 1; it returns
the attention of q over slots 0 .. lengths[b] - 1, or with `window` over the last
`window` of them, as out [B, N, H] (reference.py). Rows of length 0 (idle) give zeros. On
GPU it runs the Pallas Triton kernel (gpu.py), on TPU the Pallas Mosaic kernel (tpu.py);
other backends, and shapes the kernels do not take, use the reference (reference.py), with
a log line. Inference only: there is no
backward pass.
"""

from pallas_kernels import dispatch
from pallas_kernels.flash_attention.reference import check_window
from pallas_kernels.paged_attention import gpu, reference, tpu

KERNELS = {'gpu': gpu, 'tpu': tpu}  # Implementation name (= backend) -> kernel module.


def paged_attention(q_bnh, k_pages_pskh, v_pages_pskh, page_table_bm, lengths_b, *,
                    sm_scale: float | None = None, window: int | None = None,
                    implementation: str | None = None, block_sizes=None,
                    interpret: bool = False):
  """Returns out [B, N, H] in q's dtype.

  `window`: None, or the slots each row's new token sees, itself included (a sliding
  window; Mistral's).
  `implementation`: None picks by backend; 'gpu', 'tpu' or 'reference' force one.
  `interpret=True` runs the kernel in the Pallas interpreter (tests on CPU)."""
  reference.check_shapes(q_bnh, k_pages_pskh, v_pages_pskh, page_table_bm, lengths_b)
  check_window(window)
  window = None if window is None else int(window)
  sm_scale = q_bnh.shape[-1] ** -0.5 if sm_scale is None else sm_scale
  implementation = dispatch.pick('paged_attention', KERNELS, implementation, 'reference',
                                 lambda kernel: kernel.unsupported(q_bnh, k_pages_pskh))
  if implementation in KERNELS:
    kernel = KERNELS[implementation]
    return kernel.paged_attention(
        q_bnh, k_pages_pskh, v_pages_pskh, page_table_bm, lengths_b, sm_scale=sm_scale,
        window=window, block_sizes=block_sizes or kernel.BlockSizes(), interpret=interpret)
  if implementation != 'reference':
    raise ValueError(f'{implementation=} is not one of None, "gpu", "tpu", '
                     '"reference"')
  return reference.paged_attention(q_bnh, k_pages_pskh, v_pages_pskh, page_table_bm,
                                   lengths_b, sm_scale=sm_scale, window=window)
