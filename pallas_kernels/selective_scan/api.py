"""Selective scan: one entry point that picks the kernel for the backend.

`selective_scan(x, dt, a, b, c, reset)` takes x, dt [B, T, E], a [E, P], b, c [B, T, P]
and reset [B, T] bool (True at the first token of each document) and returns y [B, T, E]
in x's dtype (reference.py states the recurrence). On GPU it runs the Pallas Triton kernel
(gpu.py), on TPU the Pallas Mosaic kernel (tpu.py), forward and backward through one
custom_vjp whose backward recomputes states from the chunk-start states the forward saved.
Backends without a kernel run the chunked associative scan (reference.py), with a log line.
Dimension letters as in lm/__init__.py (E channels, P state size).
"""

import functools

import jax

from pallas_kernels import dispatch
from pallas_kernels.selective_scan import gpu, reference, tpu

KERNELS = {'gpu': gpu, 'tpu': tpu}  # Implementation name (= backend) -> kernel module.


@functools.cache
def _kernel_scan(kernel: str, block_sizes, interpret: bool):
  """The kernel's forward and backward as one differentiable function (cached per options,
  so the static options never pass through custom_vjp's argument list)."""
  module, options = KERNELS[kernel], dict(block_sizes=block_sizes, interpret=interpret)

  @jax.custom_vjp
  def scan(x, dt, a, b, c, reset):
    return module.forward(x, dt, a, b, c, reset, **options)[0]

  def scan_forward(x, dt, a, b, c, reset):
    y, states = module.forward(x, dt, a, b, c, reset, save_states=True, **options)
    return y, (x, dt, a, b, c, reset, states)

  def scan_backward(residuals, dy):
    return (*module.backward(*residuals, dy, **options), None)

  scan.defvjp(scan_forward, scan_backward)
  return scan


def _check_shapes(x, dt, a, b, c, reset):
  batch, length, channels = x.shape
  state = a.shape[-1]
  expected = {'dt': (dt, (batch, length, channels)), 'a': (a, (channels, state)),
              'b': (b, (batch, length, state)), 'c': (c, (batch, length, state)),
              'reset': (reset, (batch, length))}
  for name, (array, shape) in expected.items():
    if array.shape != shape:
      raise ValueError(f'{name}.shape={array.shape} should be {shape} for x.shape={x.shape} '
                       f'and a.shape={a.shape}')


def selective_scan(x, dt, a, b, c, reset, *, implementation: str | None = None,
                   block_sizes=None, interpret: bool = False):
  """`implementation`: None picks by backend; 'gpu', 'tpu', 'chunked' or 'reference'
  force one. `interpret=True` runs a kernel in the Pallas interpreter (tests on CPU)."""
  _check_shapes(x, dt, a, b, c, reset)
  implementation = dispatch.pick('selective_scan', KERNELS, implementation, 'chunked')
  if implementation in KERNELS:
    block_sizes = block_sizes or KERNELS[implementation].BlockSizes()
    return _kernel_scan(implementation, block_sizes, interpret)(x, dt, a, b, c, reset)
  if implementation == 'chunked':
    return reference.selective_scan_chunked(x, dt, a, b, c, reset)
  if implementation == 'reference':
    return reference.selective_scan(x, dt, a, b, c, reset)
  raise ValueError(f'{implementation=} is not one of None, "gpu", "tpu", "chunked", '
                   '"reference"')
