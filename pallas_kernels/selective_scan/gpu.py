"""Selective scan for GPUs in Pallas (Triton lowering), forward and backward.

Algorithm. One program per (batch row, block of `block_e` channels) holds the state
h [block_e, N] in registers and walks time in chunks of `chunk` steps. A chunk's loads are
issued together before its arithmetic (the loop body is unrolled in Python), so their
latency is paid once per chunk rather than once per step, and each kernel issues the
next chunk's loads (the backward's next is the previous) before computing this one, held
in registers across the loop (BlockSizes.backward_prefetch can turn this off in the
backward, for the registers). Per state element and step the decay exp(dt A) is one FMA
and one ex2 instruction (A comes scaled by log2 e, a reset as an exponent of -inf) and the
recurrence one more FMA.
  forward:  y_t = C_t . h_t, written per step; h never leaves the chip. For the backward
            pass it also writes the state at the start of every chunk, [B, T/chunk, E, N].
  backward: chunks in reverse. From the saved chunk-start state it recomputes the chunk's
            chunk + 1 states (registers), then runs the adjoint recurrence
              g_t = C_t dy_t + a_{t+1} g_{t+1}        (g_t = dLoss/dh_t)
            and from g_t, h_{t-1}, h_t forms every gradient of step t.
Time segments (BlockSizes.segment > 0): the recurrence is linear, so time can be split
across programs too. A first pass runs each segment from a zero state and keeps only its
end state; XLA combines them across segments (h entering segment s+1 = end_s + decay_s *
h entering s, decay_s the product of the segment's decays) and the main pass runs each
segment from its true start. The backward does the same with the adjoint carry in
reverse. It costs one state-only pass and buys T / segment times the programs. On the
H100 at B=4 T=2048 E=2048 it lost at every segment length tried (docs/benchmarks.md):
more programs did not make a program's walk through time any shorter, so it is off.
Memory traffic, forward: x, dt, y [B, T, E] and B, C [B, T, N] once (each program reads
B, C of its batch row: E / block_e times in all, mostly from L2). Backward: the same plus
dy, dx, ddt, the chunk states read once, and dB, dC partial sums per channel block,
[B, E / block_e, T, N], summed by XLA (at the H100 benchmark's shape 2 x 128 MB written and
read again); with BlockSizes.atomic_sums the kernel adds them into [B, T, N] instead.

Padding: T to a multiple of `chunk` with dt = 0 (decay 1, no input: the state passes
through); E to a multiple of both kernels' `block_e` and N to a power of two with zeros.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.padding import pad_to_multiple

LOG2_E, LN_2 = math.log2(math.e), math.log(2.0)  # exp(x) = exp2(x log2 e)


def _exp2_ftz(x):
  """2**x by one ex2.approx.ftz instruction. jnp.exp2 becomes libdevice's exp2f, which
  also handles denormal results and timed no faster than expf on the H100
  (docs/benchmarks.md); flushing results below 2**-126 to zero does not matter for a decay."""
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
  # Defaults from the H100 sweep in docs/benchmarks.md (B=4 T=2048 E=2048 N=16).
  block_e: int = 8  # Channels per program; a power of two.
  chunk: int = 8  # Time steps per unrolled loop body, and the backward's checkpoint spacing.
  num_warps: int = 1  # One warp: the per-step reductions over N and E stay in its lanes.
  num_stages: int = 1
  # Time steps per program (a multiple of chunk); 0: the whole sequence. Splitting time
  # gives T / segment times the programs, for one extra state-only pass (see above).
  segment: int = 0
  # The backward's channels per program (a power of two); 0: block_e. Its tiling is free
  # of the forward's but for `chunk`, the spacing of the saved states.
  backward_block_e: int = 0
  # The backward sums dB, dC over channel blocks by atomic adds into [B, T, N] rather than
  # writing per-block partials for XLA to sum; the order of the adds, so the last bits of
  # dB and dC, vary from run to run.
  atomic_sums: bool = False
  # The backward loads a chunk's rows while the chunk before computes. That holds a second
  # chunk of rows in registers, which caps how many programs an SM keeps resident: offline
  # for sm_90, backward_block_e=4 takes 138 registers with it (14 one-warp programs an
  # SM, short of the 2,048 programs at B=4 E=2048) and 128 without (16, all of them).
  backward_prefetch: bool = True

  def __post_init__(self):
    for name in ('block_e', 'backward_block_e'):
      value = getattr(self, name)
      if value < 0 or value & (value - 1) or (name == 'block_e' and not value):
        raise ValueError(f'{name}={value} must be a power of two'
                         + (' or 0' if name == 'backward_block_e' else ''))
    if self.chunk < 1:
      raise ValueError(f'{self.chunk=} must be positive')
    if self.segment < 0 or self.segment % self.chunk:
      raise ValueError(f'{self.segment=} must be 0 or a positive multiple of {self.chunk=}')

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
  """Padded (time to the segment or chunk), float32 where arithmetic needs it. The decay
  keep_t exp(dt_t A) becomes exp2(dt_t A log2(e) + log_keep_t), one FMA and one ex2
  instruction per state element (libdevice's expf is nine): so `a` comes back times
  log2(e) and the reset flag as `log_keep`, -inf at a reset (a zero decay), else 0."""
  time_multiple = block_sizes.segment or block_sizes.chunk
  block_e = block_sizes.channel_multiple
  state = _next_power_of_two(a.shape[1])
  pad_te = lambda t: pad_to_multiple(pad_to_multiple(t, time_multiple, 1), block_e, 2)
  pad_tn = lambda t: pad_to_multiple(pad_to_multiple(t, time_multiple, 1), state, 2)
  log_keep = pad_to_multiple(jnp.where(reset, -jnp.inf, 0.0), time_multiple, 1)
  a = pad_to_multiple(pad_to_multiple(a.astype(jnp.float32) * LOG2_E, block_e, 0), state, 1)
  return pad_te(x), pad_te(dt.astype(jnp.float32)), a, pad_tn(b), pad_tn(c), log_keep


def _load_chunk(t0, chunk, *refs):
  """Every ref's rows t0 .. t0 + chunk - 1 as float32, all loads issued before any use."""
  return [[ref[t0 + i].astype(jnp.float32) for ref in refs] for i in range(chunk)]


def _forward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, log_keep_ref, h0_ref, y_ref,
                    *states_ref, chunk, exp2):
  a = a_ref[...]  # [block_e, N], A log2(e).
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

  lax.fori_loop(0, num_chunks, one_chunk, (h0_ref[...], load(0)))


def _segment_end_kernel(x_ref, dt_ref, a_ref, b_ref, log_keep_ref, h_ref, *, chunk, exp2):
  """The state at the segment's end, starting from zero: the recurrence without y."""
  a = a_ref[...]

  def one_chunk(j, h):
    rows = _load_chunk(j * chunk, chunk, x_ref, dt_ref, b_ref, log_keep_ref)
    for x, dt, b, log_keep in rows:
      h = exp2(dt[:, None] * a + log_keep) * h + (dt * x)[:, None] * b[None, :]
    return h

  h_ref[...] = lax.fori_loop(0, x_ref.shape[0] // chunk, one_chunk,
                             jnp.zeros(a.shape, jnp.float32))


def _backward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, log_keep_ref, states_ref, dy_ref,
                     g0_ref, *refs, chunk, exp2, atomic_sums, prefetch):
  # With atomic_sums two zero arrays come first, aliased to db_ref and dc_ref.
  dx_ref, ddt_ref, da_ref, db_ref, dc_ref = refs[-5:]
  a = a_ref[...]  # [block_e, N], A log2(e).
  block_e, state_size = a.shape
  num_chunks = states_ref.shape[0]
  load = lambda j: (_load_chunk(j * chunk, chunk, x_ref, dt_ref, b_ref, c_ref, log_keep_ref,
                                dy_ref), states_ref[j])
  # Where step i of a chunk goes in its gradient tiles: [block_e, chunk] for dx and ddt
  # (stored transposed), [chunk, N] for dB and dC.
  step_column = lax.broadcasted_iota(jnp.int32, (block_e, chunk), 1)
  step_row = lax.broadcasted_iota(jnp.int32, (chunk, state_size), 0)

  def one_chunk(j, carry):
    # g_after = a_{t+1} g_{t+1}: from the next segment, then ours.
    g_after, da, loaded = carry
    j = num_chunks - 1 - j
    steps = pl.ds(j * chunk, chunk)
    if prefetch:  # As in the forward but walking back: chunk j-1's loads are in flight
      # while chunk j computes (chunk 0 reloads itself). 14% off this kernel on the H100.
      (rows, state), loaded = loaded, load(jnp.maximum(j - 1, 0))
    else:
      rows, state = load(j)
    decay = lambda dt, log_keep: exp2(dt[:, None] * a + log_keep)
    states = [state]  # The state before the chunk's first step, then after each step.
    for x, dt, b, _, log_keep, _ in rows:
      states.append(decay(dt, log_keep) * states[-1] + (dt * x)[:, None] * b[None, :])
    # Each step's gradients go into tiles stored once a chunk: storing a row a step cost
    # a layout conversion through shared memory, with a barrier, for each row.
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

  _, da, _ = lax.fori_loop(0, num_chunks, one_chunk,
                           (g0_ref[...], jnp.zeros(a.shape, jnp.float32),
                            load(num_chunks - 1) if prefetch else ()))
  da_ref[...] = da


def _segment_carry_kernel(dt_ref, a_ref, c_ref, log_keep_ref, dy_ref, g_ref, *, chunk,
                          exp2):
  """The adjoint carry a_t g_t a segment hands to the one before it, given zero from the
  one after: the backward recurrence without gradients."""
  a = a_ref[...]
  num_chunks = dt_ref.shape[0] // chunk

  def one_chunk(j, g_after):
    t0 = (num_chunks - 1 - j) * chunk
    rows = _load_chunk(t0, chunk, dt_ref, c_ref, log_keep_ref, dy_ref)
    for dt, c, log_keep, dy in reversed(rows):
      g_after = exp2(dt[:, None] * a + log_keep) * (c[None, :] * dy[:, None] + g_after)
    return g_after

  g_ref[...] = lax.fori_loop(0, num_chunks, one_chunk, jnp.zeros(a.shape, jnp.float32))


def _params(block_sizes):
  return plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                              num_stages=block_sizes.num_stages)


class _Layout:
  """Grid (batch row, channel block, time segment) and the BlockSpecs of each operand."""

  def __init__(self, padded_x, state, block_sizes, block_e):
    batch, length, channels = padded_x.shape
    self.block_e, self.chunk, self.state = block_e, block_sizes.chunk, state
    self.segment = block_sizes.segment or length
    self.grid = (batch, channels // self.block_e, length // self.segment)
    self.num_segments = self.grid[2]

  def rows(self):  # [B, T, E]
    return pl.BlockSpec((None, self.segment, self.block_e), lambda i, e, s: (i, s, e))

  def a(self):  # [E, N]
    return pl.BlockSpec((self.block_e, self.state), lambda i, e, s: (e, 0))

  def state_rows(self):  # [B, T, N]
    return pl.BlockSpec((None, self.segment, self.state), lambda i, e, s: (i, s, 0))

  def log_keep(self):  # [B, T]
    return pl.BlockSpec((None, self.segment), lambda i, e, s: (i, s))

  def per_segment(self):  # [B, S, E, N]: one state per segment
    return pl.BlockSpec((None, None, self.block_e, self.state), lambda i, e, s: (i, s, e, 0))

  def chunk_states(self):  # [B, T / chunk, E, N]
    return pl.BlockSpec((None, self.segment // self.chunk, self.block_e, self.state),
                        lambda i, e, s: (i, s, e, 0))

  def per_block(self):  # [B, E / block_e, T, N]: a channel block's partial sums
    return pl.BlockSpec((None, None, self.segment, self.state), lambda i, e, s: (i, e, s, 0))

  def per_segment_shape(self, channels):
    return jax.ShapeDtypeStruct((self.grid[0], self.num_segments, channels, self.state),
                                jnp.float32)


def _segment_decay(dt, log_keep, a, segment):
  """prod_t keep_t exp(dt_t A) over each segment, [B, S, E, N] (`a` times log2(e) and
  `log_keep` as _kernel_inputs gives them)."""
  batch, length, channels = dt.shape
  dt_sum = dt.reshape(batch, length // segment, segment, channels).sum(2)
  log_kept = log_keep.reshape(batch, length // segment, segment).sum(2)
  return jnp.exp2(dt_sum[..., None] * a + log_kept[..., None, None])


def _entering_segments(kernel, name, in_specs, operands, dt, log_keep, a, layout,
                       block_sizes, interpret, *, reverse):
  """What enters each segment, [B, S, E, N]: `kernel` gives every segment's own part (its
  end state, or with reverse its adjoint carry, from zero), and the linear recurrence
  over segments, v entering s+1 = part_s + decay_s * v entering s (reverse: s-1 from s),
  adds what the earlier (later) segments pass on."""
  local = pl.pallas_call(
      _kernel(kernel, block_sizes, interpret),
      grid=layout.grid,
      in_specs=in_specs,
      out_specs=layout.per_segment(),
      out_shape=layout.per_segment_shape(a.shape[0]),
      compiler_params=_params(block_sizes),
      interpret=interpret,
      name=name,
  )(*operands)

  def step(entering, inputs):
    local_s, decay_s = inputs
    return local_s + decay_s * entering, entering

  inputs = (jnp.moveaxis(local, 1, 0),
            jnp.moveaxis(_segment_decay(dt, log_keep, a, layout.segment), 1, 0))
  # Unrolled: a few segments' elementwise steps fuse into one XLA kernel, not one each.
  _, entering = lax.scan(step, jnp.zeros_like(local[:, 0]), inputs, reverse=reverse,
                         unroll=True)
  return jnp.moveaxis(entering, 0, 1)


def forward(x, dt, a, b, c, reset, *, block_sizes: BlockSizes = BlockSizes(),
            interpret: bool = False, save_states: bool = False):
  """x, dt [B, T, E], a [E, N], b, c [B, T, N], reset [B, T] bool -> y [B, T, E] (x's dtype)
  and, with save_states, the chunk-start states [B, T_padded / chunk, E_padded, N_padded]."""
  batch, length, channels = x.shape
  inputs = _kernel_inputs(x, dt, a, b, c, reset, block_sizes)
  x_p, dt_p, a_p, b_p, _, log_keep = inputs
  padded_length, padded_channels = x_p.shape[1:]
  layout = _Layout(x_p, a_p.shape[1], block_sizes, block_sizes.block_e)
  h0 = jnp.zeros((batch, layout.num_segments, padded_channels, layout.state), jnp.float32)
  if layout.num_segments > 1:  # Each segment's true start state, from a state-only pass.
    h0 = _entering_segments(
        _segment_end_kernel, 'selective_scan_segment_ends',
        [layout.rows(), layout.rows(), layout.a(), layout.state_rows(), layout.log_keep()],
        (x_p, dt_p, a_p, b_p, log_keep), dt_p, log_keep, a_p, layout, block_sizes,
        interpret, reverse=False)
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
                layout.state_rows(), layout.log_keep(), layout.per_segment()],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(block_sizes),
      interpret=interpret,
      name='selective_scan_forward',
  )(*inputs, h0)
  return y[:, :length, :channels], (states[0] if save_states else None)


def backward(x, dt, a, b, c, reset, states, dy, *, block_sizes: BlockSizes = BlockSizes(),
             interpret: bool = False):
  """Gradients (dx, ddt, da, db, dc) from forward's inputs, its saved states and dy."""
  batch, length, channels = x.shape
  inputs = _kernel_inputs(x, dt, a, b, c, reset, block_sizes)
  x_p, dt_p, a_p, _, c_p, log_keep = inputs
  padded_length, padded_channels = x_p.shape[1:]
  layout = _Layout(x_p, a_p.shape[1], block_sizes, block_sizes.backward_channels)
  num_blocks = layout.grid[1]
  dy = pad_to_multiple(pad_to_multiple(dy, layout.segment, 1), block_sizes.channel_multiple, 2)
  g0 = jnp.zeros((batch, layout.num_segments, padded_channels, layout.state), jnp.float32)
  if layout.num_segments > 1:  # The adjoint carry entering each segment from the next.
    g0 = _entering_segments(
        _segment_carry_kernel, 'selective_scan_segment_carries',
        [layout.rows(), layout.a(), layout.state_rows(), layout.log_keep(), layout.rows()],
        (dt_p, a_p, c_p, log_keep, dy), dt_p, log_keep, a_p, layout, block_sizes,
        interpret, reverse=True)
  in_specs = [layout.rows(), layout.rows(), layout.a(), layout.state_rows(),
              layout.state_rows(), layout.log_keep(), layout.chunk_states(), layout.rows(),
              layout.per_segment()]
  operands = [*inputs, states, dy, g0]
  if block_sizes.atomic_sums:  # dB, dC [B, T, N], zeros that every channel block adds to.
    sums_spec = layout.state_rows()
    sums_shape = jax.ShapeDtypeStruct((batch, padded_length, layout.state), jnp.float32)
    in_specs += [sums_spec, sums_spec]
    operands += [jnp.zeros(sums_shape.shape, jnp.float32)] * 2
    aliases = {len(operands) - 2: 3, len(operands) - 1: 4}
  else:  # Each channel block's partial dB, dC, [B, E / block_e, T, N], summed below.
    sums_spec = layout.per_block()
    sums_shape = jax.ShapeDtypeStruct((batch, num_blocks, padded_length, layout.state),
                                      jnp.float32)
    aliases = {}
  dx, ddt, da, db, dc = pl.pallas_call(
      _kernel(_backward_kernel, block_sizes, interpret, atomic_sums=block_sizes.atomic_sums,
              prefetch=block_sizes.backward_prefetch),
      grid=layout.grid,
      in_specs=in_specs,
      out_specs=[layout.rows(), layout.rows(), layout.per_segment(), sums_spec, sums_spec],
      out_shape=[jax.ShapeDtypeStruct(x_p.shape, x.dtype),
                 jax.ShapeDtypeStruct(x_p.shape, jnp.float32),
                 layout.per_segment_shape(padded_channels), sums_shape, sums_shape],
      input_output_aliases=aliases,
      compiler_params=_params(block_sizes),
      interpret=interpret,
      name='selective_scan_backward',
  )(*operands)
  if not block_sizes.atomic_sums:
    db, dc = jnp.sum(db, 1), jnp.sum(dc, 1)
  num_states = a.shape[1]
  return (dx[:, :length, :channels], ddt[:, :length, :channels].astype(dt.dtype),
          jnp.sum(da, (0, 1))[:channels, :num_states].astype(a.dtype),
          db[:, :length, :num_states].astype(b.dtype),
          dc[:, :length, :num_states].astype(c.dtype))
