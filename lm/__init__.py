"""lm: a JAX/Flax research codebase for language models.

Dimension letters, used in names (`x_btd`), einsum strings and shape comments across
the library, the kernels and the tests; each letter means one thing everywhere:

  B batch (rows)                T sequence / query length     S key / cache length
  D model width                 V vocabulary                  F MLP hidden width
  N query heads                 K key-value heads             H head dimension
  G query heads per kv head     E Mamba inner channels        P selective-scan state size
  R Mamba step-size rank        W convolution width           M new tokens (sampling)
  C choices (evaluation)

The one exception: paged KV caches (lm/engine, the paged path of lm/models/transformer.py,
pallas_kernels/paged_attention) write their pool of pages [P, S, K, H] (P pages of S
slots) and page tables [B, M] (M pages per row), as their docstrings say.
"""

import importlib.util as _importlib_util
import os as _os

import jax as _jax


def _cpu_when_libtpu_has_no_tpu() -> None:
  """With libtpu installed (`.[tpu]`, for compiling for TPU slices: lm/aot.py) on a machine
  with no TPU attached, JAX would try to start a TPU first, printing libtpu's errors and
  spending seconds; where no GPU plugin is installed either, the CPU is named instead.
  An explicit JAX_PLATFORMS is left as it is."""
  if _os.environ.get('JAX_PLATFORMS') or _jax.config.jax_platforms:
    return
  if _importlib_util.find_spec('libtpu') is None:
    return
  try:  # TPU chips on the PCI bus, found as JAX itself finds them.
    from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
      return
  except (ImportError, AttributeError, OSError):
    return  # Cannot tell: JAX decides.
  if any(_importlib_util.find_spec(name) for name in ('jax_cuda12_plugin', 'jax_cuda13_plugin')):
    return
  _jax.config.update('jax_platforms', 'cpu')


_cpu_when_libtpu_has_no_tpu()
