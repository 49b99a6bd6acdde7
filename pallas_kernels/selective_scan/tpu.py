"""Selective scan for TPUs in Pallas (Mosaic lowering), forward and backward.

Dimension letters as in lm/__init__.py: B, T, E (channels) and P (state size).

Layout. The state of a block of `block_e` channels is h [P, block_e]: channels on the 128
lanes, states on sublanes, so the per-step update exp(dt A) h + dt x B is dense vector
work. The grid is (batch row, channel block, time block); time is the innermost,
sequential ('arbitrary') axis and the state stays in a VMEM scratch between time blocks.
B and C arrive transposed, [P, block_t] per time block, and step t takes its column with
a lane mask and a lane reduction (Mosaic has no dynamic lane indexing). Steps go eight at
a time so x, dt, dy, y move as aligned [8, block_e] tiles.
  forward:  y_t = C_t . h_t. For the backward pass it also writes the state at the start
            of each time block, [B, T / block_t, P, E].
  backward: time blocks in reverse. From the block's start state it recomputes the
            block's states into VMEM ([block_t, P, block_e], never to HBM), then runs the
            adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} backwards, carrying a_{t+1} g_{t+1}
            between time blocks in VMEM, and forms each step's gradients from g_t, h_{t-1}.
            dA accumulates in its output block across time blocks; dB, dC are per
            channel block, [B, E / block_e, P, T], summed by XLA.
Memory traffic, forward: x, dt, y once, B and C once per channel block.

Padding: T to a multiple of block_t with dt = 0 (the state passes through), E to a
multiple of block_e and P to a multiple of 8 with zeros. Inputs go in as float32.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.padding import pad_to_multiple

_SUBLANES, _LANES = 8, 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_e: int = 256  # Channels per block, a multiple of 128.
  block_t: int = 128  # Time steps per grid step, a multiple of 128 (B and C put it on lanes).

  def __post_init__(self):
    if self.block_e % _LANES or self.block_t % _LANES:
      raise ValueError(f'{self.block_e=} and {self.block_t=} must be multiples of {_LANES}')


def _kernel_inputs(x, dt, a, b, c, reset, block_sizes):
  """x, dt [B, T, E]; a transposed [P, E]; b, c transposed [B, P, T]; keep [B, T, 1] (0.0
  at a reset): padded float32."""
  block_e, block_t = block_sizes.block_e, block_sizes.block_t
  f32 = lambda t: t.astype(jnp.float32)
  pad_te = lambda t: pad_to_multiple(pad_to_multiple(f32(t), block_t, 1), block_e, 2)
  pad_pt = lambda t: pad_to_multiple(
      pad_to_multiple(f32(t).transpose(0, 2, 1), _SUBLANES, 1), block_t, 2)
  keep = pad_to_multiple(1.0 - f32(reset), block_t, 1, value=1.0)[..., None]
  a_pe = pad_to_multiple(pad_to_multiple(f32(a).T, _SUBLANES, 0), block_e, 1)
  return pad_te(x), pad_te(dt), a_pe, pad_pt(b), pad_pt(c), keep


def _column(rows_pt, lane_pt, t):
  """Column t of a [P, block_t] tile as [P, 1]."""
  return jnp.sum(jnp.where(lane_pt == t, rows_pt, 0.0), axis=1, keepdims=True)


def _rows(ref, t0):
  return ref[pl.ds(t0, _SUBLANES), :]


def _forward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, keep_ref, y_ref, *rest, save_states):
  states_ref, h_ref = rest if save_states else (None, *rest)

  @pl.when(pl.program_id(2) == 0)
  def _():
    h_ref[...] = jnp.zeros(h_ref.shape, jnp.float32)

  if save_states:
    states_ref[...] = h_ref[...]
  a, b_pt, c_pt = a_ref[...], b_ref[...], c_ref[...]  # [P, block_e], [P, block_t] x 2
  lane_pt = lax.broadcasted_iota(jnp.int32, b_pt.shape, 1)
  sublane = lax.broadcasted_iota(jnp.int32, (_SUBLANES, a.shape[1]), 0)

  def eight_steps(group, h):
    t0 = pl.multiple_of(group * _SUBLANES, _SUBLANES)
    x8, dt8, keep8 = _rows(x_ref, t0), _rows(dt_ref, t0), _rows(keep_ref, t0)
    y8 = jnp.zeros(x8.shape, jnp.float32)
    for k in range(_SUBLANES):
      x, dt, keep = x8[k:k + 1], dt8[k:k + 1], keep8[k:k + 1]
      h = keep * jnp.exp(dt * a) * h + (dt * x) * _column(b_pt, lane_pt, t0 + k)
      y = jnp.sum(_column(c_pt, lane_pt, t0 + k) * h, axis=0, keepdims=True)
      y8 = jnp.where(sublane == k, y, y8)
    y_ref[pl.ds(t0, _SUBLANES), :] = y8
    return h

  h_ref[...] = lax.fori_loop(0, x_ref.shape[0] // _SUBLANES, eight_steps, h_ref[...])


def _backward_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, keep_ref, states_ref, dy_ref,
                     dx_ref, ddt_ref, da_ref, db_ref, dc_ref, g_ref, history_ref):
  @pl.when(pl.program_id(2) == 0)
  def _():
    g_ref[...] = jnp.zeros(g_ref.shape, jnp.float32)
    da_ref[...] = jnp.zeros(da_ref.shape, jnp.float32)

  a, b_pt, c_pt = a_ref[...], b_ref[...], c_ref[...]
  lane_pt = lax.broadcasted_iota(jnp.int32, b_pt.shape, 1)
  sublane = lax.broadcasted_iota(jnp.int32, (_SUBLANES, a.shape[1]), 0)
  num_groups = x_ref.shape[0] // _SUBLANES

  def recompute(group, h):  # history[t] = h_{t-1}
    t0 = pl.multiple_of(group * _SUBLANES, _SUBLANES)
    x8, dt8, keep8 = _rows(x_ref, t0), _rows(dt_ref, t0), _rows(keep_ref, t0)
    for k in range(_SUBLANES):
      x, dt, keep = x8[k:k + 1], dt8[k:k + 1], keep8[k:k + 1]
      history_ref[t0 + k] = h
      h = keep * jnp.exp(dt * a) * h + (dt * x) * _column(b_pt, lane_pt, t0 + k)
    return h

  lax.fori_loop(0, num_groups, recompute, states_ref[...])

  def eight_steps_back(j, carry):
    g_after, da, db_pt, dc_pt = carry  # g_after = a_{t+1} g_{t+1}.
    t0 = pl.multiple_of((num_groups - 1 - j) * _SUBLANES, _SUBLANES)
    x8, dt8, keep8, dy8 = (_rows(r, t0) for r in (x_ref, dt_ref, keep_ref, dy_ref))
    dx8 = ddt8 = jnp.zeros(x8.shape, jnp.float32)
    for k in reversed(range(_SUBLANES)):
      t = t0 + k
      x, dt, keep, dy = x8[k:k + 1], dt8[k:k + 1], keep8[k:k + 1], dy8[k:k + 1]
      b, c = _column(b_pt, lane_pt, t), _column(c_pt, lane_pt, t)  # [P, 1]
      h_before = history_ref[t]
      a_t = keep * jnp.exp(dt * a)
      h = a_t * h_before + (dt * x) * b
      g = c * dy + g_after
      g_b = jnp.sum(g * b, axis=0, keepdims=True)  # [1, block_e]
      w = g * h_before * a_t  # dLoss / d(dt_t A), elementwise.
      dx8 = jnp.where(sublane == k, dt * g_b, dx8)
      ddt8 = jnp.where(sublane == k, jnp.sum(w * a, axis=0, keepdims=True) + x * g_b, ddt8)
      db_pt = jnp.where(lane_pt == t, jnp.sum(g * (dt * x), axis=1, keepdims=True), db_pt)
      dc_pt = jnp.where(lane_pt == t, jnp.sum(h * dy, axis=1, keepdims=True), dc_pt)
      da = da + dt * w
      g_after = a_t * g
    dx_ref[pl.ds(t0, _SUBLANES), :] = dx8
    ddt_ref[pl.ds(t0, _SUBLANES), :] = ddt8
    return g_after, da, db_pt, dc_pt

  zeros_pt = jnp.zeros(b_pt.shape, jnp.float32)
  g_after, da, db_pt, dc_pt = lax.fori_loop(
      0, num_groups, eight_steps_back,
      (g_ref[...], jnp.zeros(a.shape, jnp.float32), zeros_pt, zeros_pt))
  g_ref[...] = g_after
  da_ref[...] += da
  db_ref[...] = db_pt
  dc_ref[...] = dc_pt


def _specs(block_sizes, state, num_t, reverse_time):
  """x, dt, aT, bT, cT, keep for grid step (batch row i, channel block e, time block t);
  the backward walks time blocks last to first."""
  block_e, block_t = block_sizes.block_e, block_sizes.block_t
  time = (lambda t: num_t - 1 - t) if reverse_time else (lambda t: t)
  return [
      pl.BlockSpec((None, block_t, block_e), lambda i, e, t: (i, time(t), e)),
      pl.BlockSpec((None, block_t, block_e), lambda i, e, t: (i, time(t), e)),
      pl.BlockSpec((state, block_e), lambda i, e, t: (0, e)),
      pl.BlockSpec((None, state, block_t), lambda i, e, t: (i, 0, time(t))),
      pl.BlockSpec((None, state, block_t), lambda i, e, t: (i, 0, time(t))),
      pl.BlockSpec((None, block_t, 1), lambda i, e, t: (i, time(t), 0)),
  ]


_SEMANTICS = pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary'))


def forward(x, dt, a, b, c, reset, *, block_sizes: BlockSizes = BlockSizes(),
            interpret: bool = False, save_states: bool = False):
  """x, dt [B, T, E], a [E, P], b, c [B, T, P], reset [B, T] bool -> y [B, T, E] (x's dtype)
  and, with save_states, the time-block start states [B, T_padded / block_t, P_pad, E_pad]."""
  batch, length, channels = x.shape
  inputs = _kernel_inputs(x, dt, a, b, c, reset, block_sizes)
  _, padded_length, padded_channels = inputs[0].shape
  state = inputs[2].shape[0]
  block_e, block_t = block_sizes.block_e, block_sizes.block_t
  num_t = padded_length // block_t
  out_specs = [pl.BlockSpec((None, block_t, block_e), lambda i, e, t: (i, t, e))]
  out_shape = [jax.ShapeDtypeStruct(inputs[0].shape, jnp.float32)]
  if save_states:
    out_specs.append(pl.BlockSpec((None, None, state, block_e), lambda i, e, t: (i, t, 0, e)))
    out_shape.append(jax.ShapeDtypeStruct((batch, num_t, state, padded_channels), jnp.float32))
  y, *states = pl.pallas_call(
      functools.partial(_forward_kernel, save_states=save_states),
      grid=(batch, padded_channels // block_e, num_t),
      in_specs=_specs(block_sizes, state, num_t, reverse_time=False),
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((state, block_e), jnp.float32)],
      compiler_params=_SEMANTICS,
      interpret=interpret,
      name='selective_scan_forward_tpu',
  )(*inputs)
  return y[:, :length, :channels].astype(x.dtype), (states[0] if save_states else None)


def backward(x, dt, a, b, c, reset, states, dy, *, block_sizes: BlockSizes = BlockSizes(),
             interpret: bool = False):
  """Gradients (dx, ddt, da, db, dc) from forward's inputs, its saved states and dy."""
  batch, length, channels = x.shape
  num_states = a.shape[1]
  inputs = _kernel_inputs(x, dt, a, b, c, reset, block_sizes)
  _, padded_length, padded_channels = inputs[0].shape
  state = inputs[2].shape[0]
  block_e, block_t = block_sizes.block_e, block_sizes.block_t
  num_t, num_e = padded_length // block_t, padded_channels // block_e
  dy = pad_to_multiple(pad_to_multiple(dy.astype(jnp.float32), block_t, 1), block_e, 2)
  rows = pl.BlockSpec((None, block_t, block_e), lambda i, e, t: (i, num_t - 1 - t, e))
  per_block = pl.BlockSpec((None, None, state, block_t), lambda i, e, t: (i, e, 0, num_t - 1 - t))
  dx, ddt, da, db, dc = pl.pallas_call(
      _backward_kernel,
      grid=(batch, num_e, num_t),
      in_specs=_specs(block_sizes, state, num_t, reverse_time=True) + [
          pl.BlockSpec((None, None, state, block_e), lambda i, e, t: (i, num_t - 1 - t, 0, e)),
          rows],
      out_specs=[rows, rows, pl.BlockSpec((None, state, block_e), lambda i, e, t: (i, 0, e)),
                 per_block, per_block],
      out_shape=[jax.ShapeDtypeStruct(inputs[0].shape, jnp.float32),
                 jax.ShapeDtypeStruct(inputs[0].shape, jnp.float32),
                 jax.ShapeDtypeStruct((batch, state, padded_channels), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_e, state, padded_length), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_e, state, padded_length), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((state, block_e), jnp.float32),
                      pltpu.VMEM((block_t, state, block_e), jnp.float32)],
      compiler_params=_SEMANTICS,
      interpret=interpret,
      name='selective_scan_backward_tpu',
  )(*inputs, states, dy)
  unpad_pt = lambda t, like: jnp.sum(t, 1).transpose(0, 2, 1)[:, :length, :num_states].astype(
      like.dtype)
  return (dx[:, :length, :channels].astype(x.dtype), ddt[:, :length, :channels].astype(dt.dtype),
          jnp.sum(da, 0).T[:channels, :num_states].astype(a.dtype), unpad_pt(db, b),
          unpad_pt(dc, c))
