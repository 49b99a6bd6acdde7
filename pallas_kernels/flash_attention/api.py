"""Flash attention: one entry point that picks the kernel for the backend.

`flash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, window, ...)` takes
q [B, T, N, H], k and v [B, S, K, H] (K divides N) and optional int segment ids [B, T],
[B, S]; `window` (causal only) limits each query to the `window` keys ending at its own
(reference.py). On a Hopper GPU it runs the Pallas Mosaic GPU kernels (mosaic_gpu.py:
wgmma and TMA, the fastest here), on other GPUs and for what those refuse (float32) the
Pallas Triton kernel (gpu.py), on TPU the Pallas Mosaic kernel (tpu.py); each forward and
backward through one custom_vjp whose backward recomputes from the saved log-sum-exp.
Shapes a kernel does not support, and backends without one, fall back to the reference
(reference.py) with a log line.
"""

import functools

import jax

from pallas_kernels import dispatch
from pallas_kernels.flash_attention import gpu, mosaic_gpu, reference, tpu

# Implementation name -> kernel module; a backend's name picks its default kernel.
KERNELS = {'gpu': gpu, 'tpu': tpu, 'mosaic_gpu': mosaic_gpu}


@functools.cache
def _kernel_attention(kernel: str, causal: bool, sm_scale: float, window: int | None,
                      block_sizes, interpret: bool):
  """The kernel's forward and backward as one differentiable function of (q, k, v,
  q_segment_ids, kv_segment_ids), cached per options so the static options never pass
  through custom_vjp's argument list."""
  module = KERNELS[kernel]
  options = dict(causal=causal, sm_scale=sm_scale, window=window, block_sizes=block_sizes,
                 interpret=interpret)

  @jax.custom_vjp
  def attention(q, k, v, q_segment_ids, kv_segment_ids):
    return module.forward(q, k, v, q_segment_ids, kv_segment_ids, **options)[0]

  def attention_forward(q, k, v, q_segment_ids, kv_segment_ids):
    out, lse = module.forward(q, k, v, q_segment_ids, kv_segment_ids, **options)
    return out, (q, k, v, q_segment_ids, kv_segment_ids, out, lse)

  def attention_backward(residuals, d_out):
    return (*module.backward(*residuals, d_out, **options), None, None)

  attention.defvjp(attention_forward, attention_backward)
  return attention


def flash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, causal: bool = True,
                    sm_scale: float | None = None, window: int | None = None,
                    implementation: str | None = None, block_sizes=None,
                    interpret: bool = False):
  """`window`: None, or with causal=True each query sees only the `window` keys ending at
  its own index (a sliding window; Mistral's).
  `implementation`: None picks by backend; 'gpu', 'tpu', 'mosaic_gpu' or 'reference'
  force one.
  `interpret=True` runs a kernel in the Pallas interpreter (tests on CPU)."""
  if q.shape[2] % k.shape[2]:
    raise ValueError(f'query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}')
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError('give both q_segment_ids and kv_segment_ids, or neither')
  reference.check_window(window, causal=causal)
  window = None if window is None else int(window)  # One cache entry per value.
  sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
  if implementation is None and dispatch.platform() == 'gpu':
    mosaic = mosaic_gpu.runs_here() and mosaic_gpu.unsupported(q, k) is None
    implementation = 'mosaic_gpu' if mosaic else 'gpu'
  implementation = dispatch.pick('flash_attention', KERNELS, implementation, 'reference',
                                 lambda kernel: kernel.unsupported(q, k))
  if implementation in KERNELS:  # Segment ids may be None: the kernels skip the segment mask.
    expected = KERNELS[implementation].BlockSizes
    if block_sizes is not None and not isinstance(block_sizes, expected):
      raise ValueError(f'block_sizes={block_sizes} is not the {implementation} kernel\'s '
                       f'{expected.__module__}.BlockSizes: name the implementation it is for')
    attention = _kernel_attention(implementation, causal, sm_scale, window,
                                  block_sizes or KERNELS[implementation].BlockSizes(), interpret)
    return attention(q, k, v, q_segment_ids, kv_segment_ids)
  if implementation != 'reference':
    raise ValueError(f'{implementation=} is not None, "reference" or one of {list(KERNELS)}')
  return reference.attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal,
                             sm_scale=sm_scale, window=window)
