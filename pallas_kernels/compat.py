"""The two things the kernels take from jax's private modules (jax._src), in one place.

Neither has a public API in jax 0.10.x (installed here) or in the jax 0.11.1 sources;
everything else the kernels use is public. Where a jax release exports one, take it from
there and drop the private import.
"""

from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.lib import cuda_versions as _cuda_versions  # None without a CUDA plugin.

# The Mosaic GPU interpreter's settings, passed as plgpu.kernel(interpret=...): the only way
# to run the Hopper kernels (flash_attention/mosaic_gpu.py) on the CPU, as the tests do.
# `interpret=True` picks the generic HLO interpreter, which cannot run them (it has no rule
# for run_scoped over the warpgroup axis). The public name is used where jax has one.
try:
  InterpretGPUParams = plgpu.InterpretGPUParams
except AttributeError:
  from jax._src.pallas.mosaic_gpu.interpret import params as _interpret_params
  InterpretGPUParams = _interpret_params.InterpretGPUParams


def cuda_runtime_version() -> int | None:
  """The CUDA runtime's version, 1000 * major + 10 * minor + patch (12080 for 12.8.0), or
  None where jax has no CUDA plugin. jax's own Mosaic GPU attention reads it the same way,
  to refuse causal masks on the runtimes whose ptxas has a bug there."""
  return _cuda_versions.cuda_runtime_get_version() if _cuda_versions else None
