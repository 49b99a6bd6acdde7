"""Decode attention: one entry point that picks the kernel for the backend.

`decode_attention(q, k, v, k_cache, v_cache, start)` takes one new token per row: q
[B, N, H], its key and value [B, K, H] (K divides N), the caches [B, S, K, H] and each
row's slot for the new token, start [B]. It writes the key and value at that slot and
returns the attention of q over slots 0 .. start, or with `window` over the last `window`
of them (reference.py), as out [B, N, H] with both caches. On GPU it runs the Pallas
Triton kernel (gpu.py), which updates the caches in place; other backends, and shapes the
kernel does not take, use the reference (reference.py), with a log line. Inference only:
there is no backward pass.
"""

from pallas_kernels import dispatch
from pallas_kernels.decode_attention import gpu, reference
from pallas_kernels.flash_attention.reference import check_window

KERNELS = {'gpu': gpu}  # Implementation name (= backend) -> kernel module.


def decode_attention(q_bnh, k_bkh, v_bkh, k_cache_bskh, v_cache_bskh, start_b, *,
                     sm_scale: float | None = None, window: int | None = None,
                     implementation: str | None = None, block_sizes=None,
                     interpret: bool = False):
  """`window`: None, or the slots each row's new token sees, itself included (a sliding
  window; Mistral's).
  `implementation`: None picks by backend; 'gpu' or 'reference' force one.
  `interpret=True` runs the kernel in the Pallas interpreter (tests on CPU)."""
  if q_bnh.shape[1] % k_cache_bskh.shape[2]:
    raise ValueError(f'query heads {q_bnh.shape[1]} are not a multiple of kv heads '
                     f'{k_cache_bskh.shape[2]}')
  check_window(window)
  window = None if window is None else int(window)
  sm_scale = q_bnh.shape[-1] ** -0.5 if sm_scale is None else sm_scale
  implementation = dispatch.pick('decode_attention', KERNELS, implementation, 'reference',
                                 lambda kernel: kernel.unsupported(q_bnh, k_cache_bskh))
  if implementation in KERNELS:
    kernel = KERNELS[implementation]
    return kernel.decode_attention(
        q_bnh, k_bkh, v_bkh, k_cache_bskh, v_cache_bskh, start_b, sm_scale=sm_scale,
        window=window, block_sizes=block_sizes or kernel.BlockSizes(), interpret=interpret)
  if implementation != 'reference':
    raise ValueError(f'{implementation=} is not one of None, "gpu", "reference"')
  return reference.decode_attention(q_bnh, k_bkh, v_bkh, k_cache_bskh, v_cache_bskh, start_b,
                                    sm_scale=sm_scale, window=window)
