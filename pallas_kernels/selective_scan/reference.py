"""Selective scan (Mamba-1) in plain JAX: the specification the kernels are tested against,
and the chunked associative-scan path used where no kernel runs.

Dimension letters as in lm/__init__.py: B, T, E (channels) and P (state size).
Each channel e carries a state h [P]. With step size dt, input x, the diagonal A [E, P]
and the input-dependent B_t, C_t [P] (zero-order hold on A, Euler on B, as in the paper's
implementation), and reset_t marking the first token of a new document:
  a_t = 0 if reset_t else exp(dt_t A_e)
  h_t = a_t h_{t-1} + dt_t x_t B_t
  y_t = C_t . h_t
The D skip (y + D x) is the caller's. State and arithmetic are float32; y has x's dtype.
"""

import jax
import jax.numpy as jnp


def scan_from_state(h0_bep, x_bte, dt_bte, a_ep, b_btp, c_btp, reset_bt):
  """The recurrence from state h0, a lax.scan over time: (y [B, T, E] float32, h [B, E, P])."""
  def step(h_bep, inputs):
    x_be, dt_be, b_bp, c_bp, reset_b = inputs
    decay_bep = jnp.where(reset_b[:, None, None], 0.0, jnp.exp(dt_be[..., None] * a_ep))
    h_bep = decay_bep * h_bep + (dt_be * x_be)[..., None] * b_bp[:, None, :]
    return h_bep, jnp.einsum('bep,bp->be', h_bep, c_bp)

  time_first = lambda t: jnp.swapaxes(t.astype(jnp.float32), 0, 1)
  h_bep, y_tbe = jax.lax.scan(step, h0_bep.astype(jnp.float32), (
      time_first(x_bte), time_first(dt_bte), time_first(b_btp), time_first(c_btp),
      jnp.swapaxes(reset_bt, 0, 1)))
  return jnp.swapaxes(y_tbe, 0, 1), h_bep


def selective_scan(x_bte, dt_bte, a_ep, b_btp, c_btp, reset_bt):
  """y [B, T, E] from a zero initial state: the specification."""
  h0_bep = jnp.zeros((x_bte.shape[0], x_bte.shape[2], a_ep.shape[1]), jnp.float32)
  y_bte, _ = scan_from_state(h0_bep, x_bte, dt_bte, a_ep.astype(jnp.float32), b_btp, c_btp,
                             reset_bt)
  return y_bte.astype(x_bte.dtype)


def selective_scan_chunked(x_bte, dt_bte, a_ep, b_btp, c_btp, reset_bt, *, chunk: int = 64):
  """Associative scan within chunks of `chunk` steps, the state carried between chunks.
  Parallel over time but holds one chunk's [B, chunk, E, P] states at a time."""
  h0_bep = jnp.zeros((x_bte.shape[0], x_bte.shape[2], a_ep.shape[1]), jnp.float32)
  y_bte, _ = chunked_scan_from_state(h0_bep, x_bte, dt_bte, a_ep, b_btp, c_btp, reset_bt,
                                     chunk=chunk)
  return y_bte.astype(x_bte.dtype)


def chunked_scan_from_state(h0_bep, x_bte, dt_bte, a_ep, b_btp, c_btp, reset_bt, *,
                            chunk: int = 64):
  """scan_from_state computed as selective_scan_chunked: (y float32, final state)."""
  batch, length, channels = x_bte.shape
  chunk = min(chunk, length)  # A short call (a decode step) pads to no more than itself.
  padded = -(-length // chunk) * chunk
  pad = lambda t: jnp.pad(t.astype(jnp.float32), [(0, 0), (0, padded - length)]
                          + [(0, 0)] * (t.ndim - 2))
  # Padding steps have dt = 0: decay 1 and no input, so they leave the state alone.
  x, dt, b, c = pad(x_bte), pad(dt_bte), pad(b_btp), pad(c_btp)
  reset = jnp.pad(reset_bt, ((0, 0), (0, padded - length)))
  a_ep = a_ep.astype(jnp.float32)
  # [B, padded, ...] -> [padded / chunk, B, chunk, ...]: lax.scan walks the chunks.
  to_chunks = lambda t: jnp.swapaxes(t.reshape(batch, padded // chunk, chunk, *t.shape[2:]), 0, 1)

  def combine(earlier, later):
    decay_1, state_1 = earlier
    decay_2, state_2 = later
    return decay_1 * decay_2, decay_2 * state_1 + state_2

  def one_chunk(h_bep, inputs):  # Here T is the chunk's length.
    x_bte, dt_bte, b_btp, c_btp, reset_bt = inputs
    decay_btep = jnp.where(reset_bt[..., None, None], 0.0, jnp.exp(dt_bte[..., None] * a_ep))
    drive_btep = (dt_bte * x_bte)[..., None] * b_btp[:, :, None, :]
    decay_so_far_btep, h_btep = jax.lax.associative_scan(combine, (decay_btep, drive_btep),
                                                         axis=1)
    h_btep = h_btep + decay_so_far_btep * h_bep[:, None]
    return h_btep[:, -1], jnp.einsum('btep,btp->bte', h_btep, c_btp)

  h_bep, y_chunks = jax.lax.scan(one_chunk, h0_bep.astype(jnp.float32),
                                 tuple(map(to_chunks, (x, dt, b, c, reset))))
  return jnp.swapaxes(y_chunks, 0, 1).reshape(batch, padded, channels)[:, :length], h_bep
