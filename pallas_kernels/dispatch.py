"""Which implementation a kernel entry point runs: the one asked for, or by default the
backend's kernel, falling back (with one log line per message) where there is none or
it cannot take the shapes."""

import contextlib
import contextvars
import functools

from absl import logging
import jax

# The platform programs are built for: the default backend, or while compiling ahead of
# time for devices this machine lacks (lm/aot.py: TPU from a CPU), theirs.
_TARGET = contextvars.ContextVar('target_platform', default=None)


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': where the kernels being traced will run."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def target(platform_name: str):
  """Traces in this scope pick kernels for `platform_name` ('tpu', 'gpu', 'cpu')."""
  token = _TARGET.set(platform_name)
  try:
    yield
  finally:
    _TARGET.reset(token)


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
    implementation = platform()
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
