"""Padding inputs up to a kernel's block sizes (the kernels' wrappers slice it off)."""

import jax.numpy as jnp


def pad_axis(x, length: int, axis: int, value=0):
  """x padded with `value` at the end of `axis` to `length`."""
  if x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def pad_to_multiple(x, multiple: int, axis: int, value=0):
  """x padded with `value` at the end of `axis` to the next multiple of `multiple`."""
  return pad_axis(x, -(-x.shape[axis] // multiple) * multiple, axis, value)
