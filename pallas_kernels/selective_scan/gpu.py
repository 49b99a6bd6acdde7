"""Selective scan for GPUs in Pallas (Triton lowering), forward and backward.

Dimension letters as in lm/__init__.py: B, T, E (channels) and P (state size).

Algorithm. One program per (batch row, block of `block_e` channels) holds the state
h [block_e, P] in registers and walks time in chunks of `chunk` steps. A chunk's loads are
issued together before its arithmetic (the loop body is unrolled in Python), so their
latency is paid once per chunk rather than once per step, and each kernel issues the
next chunk's loads (the backward's next is the previous) before computing this one, held
in registers across the loop (BlockSizes.backward_prefetch can turn this off in the
backward, for the registers). Per state element and step the decay exp(dt A) is one FMA
and one ex2 instruction (A comes scaled by log2 e, a reset as an exponent of -inf) and the
recurrence one more FMA.
  forward:  y_t = C_t . h_t, written per step; h never leaves the chip. For the backward
            pass it also writes the state at the start of every chunk, [B, T/chunk, E, P].
  backward: chunks in reverse. From the saved chunk-start state it recomputes the chunk's
            chunk + 1 states (registers), then runs the adjoint recurrence
              g_t = C_t dy_t + a_{t+1} g_{t+1}        (g_t = dLoss/dh_t)
            and from g_t, h_{t-1}, h_t forms every gradient of step t.
Memory traffic, forward: x, dt, y [B, T, E] and B, C [B, T, P] once (each program reads
B, C of its batch row: E / block_e times in all, mostly from L2). Backward: the same plus
dy, dx, ddt, the chunk states read once, and dB, dC partial sums per channel block,
[B, E / block_e, T, P], summed by XLA (at the H100 benchmark's shape 2 x 128 MB written and
read again); with BlockSizes.atomic_sums the kernel adds them into [B, T, P] instead.

Padding: T to a multiple of `chunk` with dt = 0 (decay 1, no input: the state passes
through); E to a multiple of both kernels' `block_e` and P to a power of two with zeros.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.padding import pad_axis, pad_to_multiple

LOG2_E, LN_2 = math.log2(math.e), math.log(2.0)  # exp(x) = exp2(x log2 e)


def _exp2_ftz(x):
  """2**x by one ex2.approx.ftz instruction. jnp.exp2 becomes libdevice's exp2f, several
  instructions that also handle denormal results; a decay loses nothing when results
  below 2**-126 flush to zero."""
  [y] = plgpu.elementwise_inline_asm(
      'ex2.approx.ftz.f32 $0, $1;', args=[x], constraints='=f,f', pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
  return y


def _kernel(kernel, block_sizes, interpret, **options):
  """`kernel` with its static options; the interpreter has no PTX, so it gets jnp.exp2."""
  return functools.partial(kernel, chunk=block_sizes.chunk,
                           exp2=jnp.exp2 if interpret else _exp2_ftz, **options)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  # Defaults: the fastest tiling on the H100 at B=4 T=2048 E=2048 P=16 (docs/benchmarks.md).
  block_e: int = 8  # Channels per program; a power of two.
  chunk: int = 8  # Time steps per unrolled loop body, and the backward's checkpoint spacing.
  num_warps: int = 1  # One warp: the per-step reductions over P and E stay in its lanes.
  num_stages: int = 1
  # The backward's channels per program (a power of two); 0: block_e. Its tiling is free
  # of the forward's but for `chunk`, the spacing of the saved states.
  backward_block_e: int = 0
  # The backward sums dB, dC over channel blocks by atomic adds into [B, T, P] rather than
  # writing per-block partials for XLA to sum; the order of the adds, so the last bits of
  # dB and dC, varies from run to run.
  atomic_sums: bool = False
  # The backward loads a chunk's rows while the chunk before computes. That holds a second
  # chunk of rows in registers, which caps how many programs an SM keeps resident: for
  # sm_90 at backward_block_e=4 the kernel takes 138 registers with it (14 one-warp
  # programs an SM, too few to hold the 2,048 programs of B=4 E=2048 at once) and 128
  # without (16, all of them).
  backward_prefetch: bool = True

  def __post_init__(self):
    for name in ('block_e', 'backward_block_e'):
      value = getattr(self, name)
      if value < 0 or value & (value - 1) or (name == 'block_e' and not value):
        raise ValueError(f'{name}={value} must be a power of two'
                         + (' or 0' if name == 'backward_block_e' else ''))
    if self.chunk < 1:
      raise ValueError(f'{self.chunk=} must be positive')

  @property
  def backward_channels(self):
    return self.backward_block_e or self.block_e

  @property
  def channel_multiple(self):
    """Channels pad to this, a multiple of both kernels' blocks (powers of two)."""
    return max(self.block_e, self.backward_channels)


def _next_power_of_two(n):
  return 1 << (n - 1).bit_length()


def _kernel_inputs(x, dt, a, b, c, reset, block_sizes):
  """Padded (time to the chunk), float32 where arithmetic needs it. The decay
  keep_t exp(dt_t A) becomes exp2(dt_t A log2(e) + log_keep_t), one FMA and one ex2
  instruction per state element (libdevice's expf is nine): so `a` comes back times
  log2(e) and the reset flag as `log_keep`, -inf at a reset (a zero decay), else 0."""
  chunk, block_e = block_sizes.chunk, block_sizes.channel_multiple
  state = _next_power_of_two(a.shape[1])
  pad_te = lambda t: pad_to_multiple(pad_to_multiple(t, chunk, 1), block_e, 2)
  pad_tp = lambda t: pad_to_multiple(pad_to_multiple(t, chunk, 1), state, 2)
  log_keep = pad_to_multiple(jnp.where(reset, -jnp.inf, 0.0), chunk, 1)
  a = pad_to_multiple(pad_to_multiple(a.astype(jnp.float32) * LOG2_E, block_e, 0), state, 1)
  return pad_te(x), pad_te(dt.astype(jnp.float32)), a, pad_tp(b), pad_tp(c), log_keep


def _load_chunk(t0, chunk, *refs):
  """Every ref's rows t0 .. t0 + chunk - 1 as float32, all loads issued before any use."""
  return [[ref[t0 + i].astype(jnp.float32) for ref in refs] for i in range(chunk)]


def _forward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, log_keep_ref, y_ref, *states_ref,
                    chunk, exp2):
  a = a_ref[...]  # [block_e, P], A log2(e).
  num_chunks = x_ref.shape[0] // chunk
  load = lambda j: _load_chunk(j * chunk, chunk, x_ref, dt_ref, b_ref, c_ref, log_keep_ref)

  def one_chunk(j, carry):
    h, rows = carry
    if states_ref:
      states_ref[0][j] = h
    # Prefetch: the next chunk's loads are in flight while this chunk computes (the last
    # chunk reloads itself rather than read past the end).
    next_rows = load(jnp.minimum(j + 1, num_chunks - 1))
    for i, (x, dt, b, c, log_keep) in enumerate(rows):
      h = exp2(dt[:, None] * a + log_keep) * h + (dt * x)[:, None] * b[None, :]
      y_ref[j * chunk + i] = jnp.sum(h * c[None, :], axis=1).astype(y_ref.dtype)
    return h, next_rows

  lax.fori_loop(0, num_chunks, one_chunk, (jnp.zeros(a.shape, jnp.float32), load(0)))


def _backward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, log_keep_ref, states_ref, dy_ref,
                     *refs, chunk, exp2, atomic_sums, prefetch):
  # With atomic_sums two zero arrays come first, aliased to db_ref and dc_ref.
  dx_ref, ddt_ref, da_ref, db_ref, dc_ref = refs[-5:]
  a = a_ref[...]  # [block_e, P], A log2(e).
  block_e, state_size = a.shape
  num_chunks = states_ref.shape[0]
  load = lambda j: (_load_chunk(j * chunk, chunk, x_ref, dt_ref, b_ref, c_ref, log_keep_ref,
                                dy_ref), states_ref[j])
  # Where step i of a chunk goes in its gradient tiles: [block_e, chunk] for dx and ddt
  # (stored transposed), [chunk, P] for dB and dC.
  step_column = lax.broadcasted_iota(jnp.int32, (block_e, chunk), 1)
  step_row = lax.broadcasted_iota(jnp.int32, (chunk, state_size), 0)

  def one_chunk(j, carry):
    g_after, da, loaded = carry  # g_after = a_{t+1} g_{t+1}; zero after the last step.
    j = num_chunks - 1 - j
    steps = pl.ds(j * chunk, chunk)
    if prefetch:  # As in the forward but walking back: chunk j-1's loads are in flight
      # while chunk j computes (chunk 0 reloads itself); 14% off this kernel on the H100.
      (rows, state), loaded = loaded, load(jnp.maximum(j - 1, 0))
    else:
      rows, state = load(j)
    decay = lambda dt, log_keep: exp2(dt[:, None] * a + log_keep)
    states = [state]  # The state before the chunk's first step, then after each step.
    for x, dt, b, _, log_keep, _ in rows:
      states.append(decay(dt, log_keep) * states[-1] + (dt * x)[:, None] * b[None, :])
    # Each step's gradients go into tiles stored once a chunk: a row stored per step
    # costs a layout conversion through shared memory, with a barrier, for each row.
    dx = ddt = jnp.zeros((block_e, chunk), jnp.float32)
    db = dc = jnp.zeros((chunk, state_size), jnp.float32)
    for i in reversed(range(chunk)):
      x, dt, b, c, log_keep, dy = rows[i]
      a_t = decay(dt, log_keep)  # Recomputed rather than held: registers are the limit here.
      g = c[None, :] * dy[:, None] + g_after
      g_b = jnp.sum(g * b[None, :], axis=1)
      w = g * states[i] * a_t  # dLoss / d(dt_t A), elementwise.
      at_step = lambda where, row, tile: jnp.where(where == i, row, tile)
      dx = at_step(step_column, (dt * g_b)[:, None], dx)
      ddt_t = LN_2 * jnp.sum(w * a, axis=1) + x * g_b  # a is A log2(e).
      ddt = at_step(step_column, ddt_t[:, None], ddt)
      db = at_step(step_row, jnp.sum(g * (dt * x)[:, None], axis=0)[None, :], db)
      dc = at_step(step_row, jnp.sum(states[i + 1] * dy[:, None], axis=0)[None, :], dc)
      da = da + dt[:, None] * w
      g_after = a_t * g
    if atomic_sums:  # Every channel block of the batch row adds into the same rows.
      # Pallas's atomic add is acquire-release (a fence and an L1 invalidation each), so
      # it is issued once a chunk, on whole tiles, and before this chunk's stores, which
      # its fence would otherwise wait for.
      plgpu.atomic_add(db_ref, (steps, slice(None)), db)
      plgpu.atomic_add(dc_ref, (steps, slice(None)), dc)
    else:
      db_ref[steps, :] = db
      dc_ref[steps, :] = dc
    dx_ref[steps, :] = dx.T.astype(dx_ref.dtype)
    ddt_ref[steps, :] = ddt.T
    return g_after, da, loaded

  zeros = jnp.zeros(a.shape, jnp.float32)
  _, da, _ = lax.fori_loop(0, num_chunks, one_chunk,
                           (zeros, zeros, load(num_chunks - 1) if prefetch else ()))
  da_ref[...] = da


def _params(block_sizes):
  return plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                              num_stages=block_sizes.num_stages)


class _Layout:
  """Grid (batch row, channel block) and the BlockSpecs of each operand."""

  def __init__(self, padded_x, state, block_sizes, block_e):
    batch, self.length, channels = padded_x.shape
    self.block_e, self.chunk, self.state = block_e, block_sizes.chunk, state
    self.grid = (batch, channels // block_e)

  def rows(self):  # [B, T, E]
    return pl.BlockSpec((None, self.length, self.block_e), lambda i, e: (i, 0, e))

  def a(self):  # [E, P]
    return pl.BlockSpec((self.block_e, self.state), lambda i, e: (e, 0))

  def state_rows(self):  # [B, T, P]
    return pl.BlockSpec((None, self.length, self.state), lambda i, e: (i, 0, 0))

  def log_keep(self):  # [B, T]
    return pl.BlockSpec((None, self.length), lambda i, e: (i, 0))

  def per_row_a(self):  # [B, E, P]: a batch row's part of dA
    return pl.BlockSpec((None, self.block_e, self.state), lambda i, e: (i, e, 0))

  def chunk_states(self):  # [B, T / chunk, E, P]
    return pl.BlockSpec((None, self.length // self.chunk, self.block_e, self.state),
                        lambda i, e: (i, 0, e, 0))

  def per_block(self):  # [B, E / block_e, T, P]: a channel block's partial sums
    return pl.BlockSpec((None, None, self.length, self.state), lambda i, e: (i, e, 0, 0))


def forward(x, dt, a, b, c, reset, *, block_sizes: BlockSizes = BlockSizes(),
            interpret: bool = False, save_states: bool = False):
  """x, dt [B, T, E], a [E, P], b, c [B, T, P], reset [B, T] bool -> y [B, T, E] (x's dtype)
  and, with save_states, the chunk-start states [B, T_padded / chunk, E_padded, P_padded]."""
  batch, length, channels = x.shape
  inputs = _kernel_inputs(x, dt, a, b, c, reset, block_sizes)
  x_p, a_p = inputs[0], inputs[2]
  padded_length, padded_channels = x_p.shape[1:]
  layout = _Layout(x_p, a_p.shape[1], block_sizes, block_sizes.block_e)
  out_specs = [layout.rows()]
  out_shape = [jax.ShapeDtypeStruct(x_p.shape, x.dtype)]
  if save_states:
    out_specs.append(layout.chunk_states())
    out_shape.append(jax.ShapeDtypeStruct(
        (batch, padded_length // block_sizes.chunk, padded_channels, layout.state),
        jnp.float32))
  y, *states = pl.pallas_call(
      _kernel(_forward_kernel, block_sizes, interpret),
      grid=layout.grid,
      in_specs=[layout.rows(), layout.rows(), layout.a(), layout.state_rows(),
                layout.state_rows(), layout.log_keep()],
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
  x_p, a_p = inputs[0], inputs[2]
  padded_length, padded_channels = x_p.shape[1:]
  layout = _Layout(x_p, a_p.shape[1], block_sizes, block_sizes.backward_channels)
  num_blocks = layout.grid[1]
  dy = pad_axis(pad_axis(dy, padded_length, 1), padded_channels, 2)
  in_specs = [layout.rows(), layout.rows(), layout.a(), layout.state_rows(),
              layout.state_rows(), layout.log_keep(), layout.chunk_states(), layout.rows()]
  operands = [*inputs, states, dy]
  if block_sizes.atomic_sums:  # dB, dC [B, T, P], zeros that every channel block adds to.
    sums_spec = layout.state_rows()
    sums_shape = jax.ShapeDtypeStruct((batch, padded_length, layout.state), jnp.float32)
    in_specs += [sums_spec, sums_spec]
    operands += [jnp.zeros(sums_shape.shape, jnp.float32)] * 2
    aliases = {len(operands) - 2: 3, len(operands) - 1: 4}
  else:  # Each channel block's partial dB, dC, [B, E / block_e, T, P], summed below.
    sums_spec = layout.per_block()
    sums_shape = jax.ShapeDtypeStruct((batch, num_blocks, padded_length, layout.state),
                                      jnp.float32)
    aliases = {}
  dx, ddt, da, db, dc = pl.pallas_call(
      _kernel(_backward_kernel, block_sizes, interpret, atomic_sums=block_sizes.atomic_sums,
              prefetch=block_sizes.backward_prefetch),
      grid=layout.grid,
      in_specs=in_specs,
      out_specs=[layout.rows(), layout.rows(), layout.per_row_a(), sums_spec, sums_spec],
      out_shape=[jax.ShapeDtypeStruct(x_p.shape, x.dtype),
                 jax.ShapeDtypeStruct(x_p.shape, jnp.float32),
                 jax.ShapeDtypeStruct((batch, padded_channels, layout.state), jnp.float32),
                 sums_shape, sums_shape],
      input_output_aliases=aliases,
      compiler_params=_params(block_sizes),
      interpret=interpret,
      name='selective_scan_backward',
  )(*operands)
  if not block_sizes.atomic_sums:
    db, dc = jnp.sum(db, 1), jnp.sum(dc, 1)
  num_states = a.shape[1]
  return (dx[:, :length, :channels], ddt[:, :length, :channels].astype(dt.dtype),
          jnp.sum(da, 0)[:channels, :num_states].astype(a.dtype),
          db[:, :length, :num_states].astype(b.dtype),
          dc[:, :length, :num_states].astype(c.dtype))
