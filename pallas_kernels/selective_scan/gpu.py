"""Selective scan for GPUs in Pallas (Triton lowering), forward and backward.

Algorithm. One program per (batch row, block of `block_e` channels) holds the state
h [block_e, N] in registers and walks time in chunks of `chunk` steps. A chunk's loads are
issued together before its arithmetic (the loop body is unrolled in Python), so their
latency is paid once per chunk rather than once per step, and the forward issues the
next chunk's loads before computing this one (held in registers across the loop); the
recurrence itself is one fused multiply-add per state element per step.
  forward:  y_t = C_t . h_t, written per step; h never leaves the chip. For the backward
            pass it also writes the state at the start of every chunk, [B, T/chunk, E, N].
  backward: chunks in reverse. From the saved chunk-start state it recomputes the chunk's
            chunk + 1 states (registers), then runs the adjoint recurrence
              g_t = C_t dy_t + a_{t+1} g_{t+1}        (g_t = dLoss/dh_t)
            and from g_t, h_{t-1}, h_t forms every gradient of step t.
Memory traffic, forward: x, dt, y [B, T, E] and B, C [B, T, N] once (each program reads
B, C of its batch row: E / block_e times in all, mostly from L2). Backward: the same plus
dy, dx, ddt, the chunk states read once, and dB, dC partial sums per channel block,
[B, E / block_e, T, N], summed by XLA.

Padding: T to a multiple of `chunk` with dt = 0 (decay 1, no input: the state passes
through); E to a multiple of `block_e` and N to a power of two with zeros.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.padding import pad_to_multiple


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_e: int = 32  # Channels per program; a power of two.
  chunk: int = 16  # Time steps per unrolled loop body, and the backward's checkpoint spacing.
  num_warps: int = 2
  num_stages: int = 1

  def __post_init__(self):
    if self.block_e & (self.block_e - 1) or self.chunk < 1:
      raise ValueError(f'{self.block_e=} must be a power of two and {self.chunk=} positive')


def _next_power_of_two(n):
  return 1 << (n - 1).bit_length()


def _kernel_inputs(x, dt, a, b, c, reset, block_sizes):
  """Padded, float32 where arithmetic needs it; `keep` is 0.0 at a reset, else 1.0."""
  chunk, block_e = block_sizes.chunk, block_sizes.block_e
  state = _next_power_of_two(a.shape[1])
  pad_te = lambda t: pad_to_multiple(pad_to_multiple(t, chunk, 1), block_e, 2)
  pad_tn = lambda t: pad_to_multiple(pad_to_multiple(t, chunk, 1), state, 2)
  keep = pad_to_multiple(1.0 - reset.astype(jnp.float32), chunk, 1, value=1.0)
  a = pad_to_multiple(pad_to_multiple(a.astype(jnp.float32), block_e, 0), state, 1)
  return pad_te(x), pad_te(dt.astype(jnp.float32)), a, pad_tn(b), pad_tn(c), keep


def _load_chunk(t0, chunk, *refs):
  """Every ref's rows t0 .. t0 + chunk - 1 as float32, all loads issued before any use."""
  return [[ref[t0 + i].astype(jnp.float32) for ref in refs] for i in range(chunk)]


def _forward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, keep_ref, y_ref, *states_ref, chunk):
  a = a_ref[...]  # [block_e, N]
  num_chunks = x_ref.shape[0] // chunk
  load = lambda j: _load_chunk(j * chunk, chunk, x_ref, dt_ref, b_ref, c_ref, keep_ref)

  def one_chunk(j, carry):
    h, rows = carry
    if states_ref:
      states_ref[0][j] = h
    # Prefetch: the next chunk's loads are in flight while this chunk computes (the last
    # chunk reloads itself rather than read past the end).
    next_rows = load(jnp.minimum(j + 1, num_chunks - 1))
    for i, (x, dt, b, c, keep) in enumerate(rows):
      h = keep * jnp.exp(dt[:, None] * a) * h + (dt * x)[:, None] * b[None, :]
      y_ref[j * chunk + i] = jnp.sum(h * c[None, :], axis=1).astype(y_ref.dtype)
    return h, next_rows

  lax.fori_loop(0, num_chunks, one_chunk, (jnp.zeros(a.shape, jnp.float32), load(0)))


def _backward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, keep_ref, states_ref, dy_ref,
                     dx_ref, ddt_ref, da_ref, db_ref, dc_ref, *, chunk):
  a = a_ref[...]  # [block_e, N]
  num_chunks = states_ref.shape[0]

  def one_chunk(j, carry):
    g_after, da = carry  # g_after = a_{t+1} g_{t+1}, zero after the last step.
    j = num_chunks - 1 - j
    t0 = j * chunk
    rows = _load_chunk(t0, chunk, x_ref, dt_ref, b_ref, c_ref, keep_ref, dy_ref)
    decay = lambda dt, keep: keep * jnp.exp(dt[:, None] * a)
    states = [states_ref[j]]  # h_{t0-1}, h_{t0}, ..., h_{t0+chunk-1}
    for x, dt, b, _, keep, _ in rows:
      states.append(decay(dt, keep) * states[-1] + (dt * x)[:, None] * b[None, :])
    for i in reversed(range(chunk)):
      x, dt, b, c, keep, dy = rows[i]
      a_t = decay(dt, keep)  # Recomputed rather than held: registers are the limit here.
      g = c[None, :] * dy[:, None] + g_after
      g_b = jnp.sum(g * b[None, :], axis=1)
      w = g * states[i] * a_t  # dLoss / d(dt_t A), elementwise.
      dx_ref[t0 + i] = (dt * g_b).astype(dx_ref.dtype)
      ddt_ref[t0 + i] = jnp.sum(w * a, axis=1) + x * g_b
      db_ref[t0 + i] = jnp.sum(g * (dt * x)[:, None], axis=0)
      dc_ref[t0 + i] = jnp.sum(states[i + 1] * dy[:, None], axis=0)
      da = da + dt[:, None] * w
      g_after = a_t * g
    return g_after, da

  zeros = jnp.zeros(a.shape, jnp.float32)
  _, da = lax.fori_loop(0, num_chunks, one_chunk, (zeros, zeros))
  da_ref[...] = da


def _params(block_sizes):
  return plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                              num_stages=block_sizes.num_stages)


def _specs(length, block_e, state):
  """x, dt, a, b, c, keep for the program (batch row, channel block)."""
  rows = pl.BlockSpec((None, length, block_e), lambda i, e: (i, 0, e))
  return [rows, rows,
          pl.BlockSpec((block_e, state), lambda i, e: (e, 0)),
          pl.BlockSpec((None, length, state), lambda i, e: (i, 0, 0)),
          pl.BlockSpec((None, length, state), lambda i, e: (i, 0, 0)),
          pl.BlockSpec((None, length), lambda i, e: (i, 0))]


def forward(x, dt, a, b, c, reset, *, block_sizes: BlockSizes = BlockSizes(),
            interpret: bool = False, save_states: bool = False):
  """x, dt [B, T, E], a [E, N], b, c [B, T, N], reset [B, T] bool -> y [B, T, E] (x's dtype)
  and, with save_states, the chunk-start states [B, T_padded / chunk, E_padded, N_padded]."""
  batch, length, channels = x.shape
  inputs = _kernel_inputs(x, dt, a, b, c, reset, block_sizes)
  _, padded_length, padded_channels = inputs[0].shape
  state = inputs[2].shape[1]
  block_e, chunk = block_sizes.block_e, block_sizes.chunk
  num_chunks = padded_length // chunk
  out_specs = [pl.BlockSpec((None, padded_length, block_e), lambda i, e: (i, 0, e))]
  out_shape = [jax.ShapeDtypeStruct(inputs[0].shape, x.dtype)]
  if save_states:
    out_specs.append(pl.BlockSpec((None, num_chunks, block_e, state), lambda i, e: (i, 0, e, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, num_chunks, padded_channels, state),
                                          jnp.float32))
  y, *states = pl.pallas_call(
      functools.partial(_forward_kernel, chunk=chunk),
      grid=(batch, padded_channels // block_e),
      in_specs=_specs(padded_length, block_e, state),
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(block_sizes),
      interpret=interpret,
      name='selective_scan_forward',
  )(*inputs)
  return y[:, :length, :channels], (states[0] if save_states else None)


def backward(x, dt, a, b, c, reset, states, dy, *, block_sizes: BlockSizes = BlockSizes(),
             interpret: bool = False):
  """Gradients (dx, ddt, da, db, dc) from forward's inputs, its saved states and dy."""
  batch, length, channels = x.shape
  inputs = _kernel_inputs(x, dt, a, b, c, reset, block_sizes)
  _, padded_length, padded_channels = inputs[0].shape
  state = inputs[2].shape[1]
  block_e, chunk = block_sizes.block_e, block_sizes.chunk
  num_blocks = padded_channels // block_e
  dy = pad_to_multiple(pad_to_multiple(dy, chunk, 1), block_e, 2)
  rows = pl.BlockSpec((None, padded_length, block_e), lambda i, e: (i, 0, e))
  per_block = pl.BlockSpec((None, None, padded_length, state), lambda i, e: (i, e, 0, 0))
  dx, ddt, da, db, dc = pl.pallas_call(
      functools.partial(_backward_kernel, chunk=chunk),
      grid=(batch, num_blocks),
      in_specs=_specs(padded_length, block_e, state) + [
          pl.BlockSpec((None, states.shape[1], block_e, state), lambda i, e: (i, 0, e, 0)),
          rows],
      out_specs=[rows, rows, pl.BlockSpec((None, block_e, state), lambda i, e: (i, e, 0)),
                 per_block, per_block],
      out_shape=[jax.ShapeDtypeStruct(inputs[0].shape, x.dtype),
                 jax.ShapeDtypeStruct(inputs[0].shape, jnp.float32),
                 jax.ShapeDtypeStruct((batch, padded_channels, state), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_blocks, padded_length, state), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_blocks, padded_length, state), jnp.float32)],
      compiler_params=_params(block_sizes),
      interpret=interpret,
      name='selective_scan_backward',
  )(*inputs, states, dy)
  num_states = a.shape[1]
  return (dx[:, :length, :channels], ddt[:, :length, :channels].astype(dt.dtype),
          jnp.sum(da, 0)[:channels, :num_states].astype(a.dtype),
          jnp.sum(db, 1)[:, :length, :num_states].astype(b.dtype),
          jnp.sum(dc, 1)[:, :length, :num_states].astype(c.dtype))
