"""Flash attention: one entry point that picks the kernel for the backend.

`flash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, ...)` takes q
[B, T, N, H], k and v [B, S, K, H] (K divides N) and optional int segment ids [B, T],
[B, S]. On GPU it runs the Pallas Triton kernel (forward and backward through
custom_vjp, the backward recomputing from the saved log-sum-exp). Shapes a kernel
does not support, and backends without one, fall back to the reference, with a log line.
"""

import dataclasses
import functools

from absl import logging
import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import gpu, reference


@dataclasses.dataclass(frozen=True)
class _Options:
  causal: bool
  sm_scale: float
  block_sizes: gpu.BlockSizes
  interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gpu_attention(q, k, v, q_segment_ids, kv_segment_ids, options):
  return _gpu_forward(q, k, v, q_segment_ids, kv_segment_ids, options)[0]


def _gpu_forward(q, k, v, q_segment_ids, kv_segment_ids, options):
  out, lse = gpu.forward(q, k, v, q_segment_ids, kv_segment_ids, causal=options.causal,
                         sm_scale=options.sm_scale, block_sizes=options.block_sizes,
                         interpret=options.interpret)
  return out, (q, k, v, q_segment_ids, kv_segment_ids, out, lse)


def _gpu_backward(options, residuals, d_out):
  dq, dk, dv = gpu.backward(*residuals, d_out, causal=options.causal,
                            sm_scale=options.sm_scale, block_sizes=options.block_sizes,
                            interpret=options.interpret)
  return dq, dk, dv, None, None


_gpu_attention.defvjp(_gpu_forward, _gpu_backward)


_KERNELS = {'gpu': 'gpu'}  # backend -> kernel; the TPU kernel is still to come.


@functools.cache
def _warn_once(message: str) -> None:
  # Traced once per shape, called on every step: one line is enough.
  logging.warning('flash_attention: %s', message)


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def gpu_unsupported(q, k) -> str | None:
  """Why the Triton kernel cannot take these shapes, or None."""
  head_dim, groups = q.shape[-1], q.shape[2] // k.shape[2]
  if not (_is_power_of_two(head_dim) and 16 <= head_dim <= 256):
    return f'{head_dim=} is not a power of two in [16, 256]'
  if not _is_power_of_two(groups):
    return f'query heads per kv head ({groups}) is not a power of two'
  return None


def flash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, causal: bool = True,
                    sm_scale: float | None = None, implementation: str | None = None,
                    block_sizes: gpu.BlockSizes | None = None, interpret: bool = False):
  """`implementation`: None picks by backend; 'gpu' or 'reference' force one.
  `interpret=True` runs the kernel in the Pallas interpreter (tests on CPU)."""
  if q.shape[2] % k.shape[2]:
    raise ValueError(f'query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}')
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError('give both q_segment_ids and kv_segment_ids, or neither')
  sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
  if implementation is None:
    implementation = _KERNELS.get(jax.default_backend())
    if implementation is None:
      _warn_once(f'no flash-attention kernel for the {jax.default_backend()} backend;'
                 ' using the reference')
      implementation = 'reference'
  if implementation == 'gpu':
    reason = gpu_unsupported(q, k)
    if reason is None:
      if q_segment_ids is None:
        q_segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
        kv_segment_ids = jnp.zeros(k.shape[:2], jnp.int32)
      options = _Options(causal, sm_scale, block_sizes or gpu.BlockSizes(), interpret)
      return _gpu_attention(q, k, v, q_segment_ids, kv_segment_ids, options)
    _warn_once(f'falling back to the reference: {reason}')
  elif implementation != 'reference':
    raise ValueError(f'{implementation=} is not one of None, "gpu", "reference"')
  return reference.attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal,
                             sm_scale=sm_scale)
