"""Where the kernel tests run. On CPU (CI): every kernel in the Pallas interpreter.
Pointed at an accelerator (`JAX_PLATFORMS=cuda pytest tests/test_flash_attention.py`):
that backend's kernel, compiled for real, against the same references."""

import jax

ON_DEVICE = jax.default_backend() in ('gpu', 'tpu')
INTERPRET = not ON_DEVICE


def kernels(available) -> list[str]:
  return [jax.default_backend()] if ON_DEVICE else sorted(available)


def matmul_tolerance(dtype_tolerance: float) -> float:
  """Compiled float32 matmuls on a GPU run in TF32 (10-bit mantissa): about 1e-3."""
  return max(dtype_tolerance, 5e-3) if ON_DEVICE and jax.default_backend() == 'gpu' \
      else dtype_tolerance


if ON_DEVICE:  # The references' float32 matmuls in full float32, not TF32.
  jax.config.update('jax_default_matmul_precision', 'highest')
