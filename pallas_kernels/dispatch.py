"""Which implementation a kernel entry point runs: the one asked for, or by default the
backend's kernel, falling back (with one log line per message) where there is none or
it cannot take the shapes."""

import functools

from absl import logging
import jax


@functools.cache
def _warn_once(message: str) -> None:
  # Traced once per shape but called every step: one line is enough.
  logging.warning(message)


def pick(entry_point: str, kernels: dict, implementation: str | None, fallback: str,
         unsupported=lambda kernel: None) -> str:
  """`implementation` if given, else the backend's name when `kernels` has it, else
  `fallback`. A kernel (module) for which `unsupported(kernel)` gives a reason yields
  `fallback` too. Names outside `kernels` pass through for the caller to check."""
  if implementation is None:
    implementation = jax.default_backend()
    if implementation not in kernels:
      _warn_once(f'{entry_point}: no kernel for the {implementation} backend; using the '
                 f'{fallback}')
      return fallback
  if implementation in kernels:
    reason = unsupported(kernels[implementation])
    if reason is not None:
      _warn_once(f'{entry_point}: {implementation} kernel: falling back to the {fallback}: '
                 f'{reason}')
      return fallback
  return implementation
