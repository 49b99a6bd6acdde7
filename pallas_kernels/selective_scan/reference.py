"""Selective scan (Mamba-1) in plain JAX: the specification the kernels are tested against,
and the chunked associative-scan path used where no kernel runs.

Dimension letters: B batch, T time, E channels, N state size.
Each channel e carries a state h [N]. With step size dt, input x, the diagonal A [E, N]
and the input-dependent B_t, C_t [N] (zero-order hold on A, Euler on B, as in the paper's
implementation), and reset_t marking the first token of a new document:
  a_t = 0 if reset_t else exp(dt_t A_e)
  h_t = a_t h_{t-1} + dt_t x_t B_t
  y_t = C_t . h_t
The D skip (y + D x) is the caller's. State and arithmetic are float32; y has x's dtype.
"""

import jax
import jax.numpy as jnp


def scan_from_state(h0_ben, x_bte, dt_bte, a_en, b_btn, c_btn, reset_bt):
  """The recurrence from state h0, a lax.scan over time: (y [B, T, E] float32, h [B, E, N])."""
  def step(h_ben, inputs):
    x_be, dt_be, b_bn, c_bn, reset_b = inputs
    decay_ben = jnp.where(reset_b[:, None, None], 0.0, jnp.exp(dt_be[..., None] * a_en))
    h_ben = decay_ben * h_ben + (dt_be * x_be)[..., None] * b_bn[:, None, :]
    return h_ben, jnp.einsum('ben,bn->be', h_ben, c_bn)

  time_first = lambda t: jnp.swapaxes(t.astype(jnp.float32), 0, 1)
  h_ben, y_tbe = jax.lax.scan(step, h0_ben.astype(jnp.float32), (
      time_first(x_bte), time_first(dt_bte), time_first(b_btn), time_first(c_btn),
      jnp.swapaxes(reset_bt, 0, 1)))
  return jnp.swapaxes(y_tbe, 0, 1), h_ben


def selective_scan(x_bte, dt_bte, a_en, b_btn, c_btn, reset_bt):
  """y [B, T, E] from a zero initial state: the specification."""
  h0_ben = jnp.zeros((x_bte.shape[0], x_bte.shape[2], a_en.shape[1]), jnp.float32)
  y_bte, _ = scan_from_state(h0_ben, x_bte, dt_bte, a_en.astype(jnp.float32), b_btn, c_btn,
                             reset_bt)
  return y_bte.astype(x_bte.dtype)


def selective_scan_chunked(x_bte, dt_bte, a_en, b_btn, c_btn, reset_bt, *, chunk: int = 64):
  """Associative scan within chunks of `chunk` steps, the state carried between chunks.
  Parallel over time but holds one chunk's [B, chunk, E, N] states at a time."""
  h0_ben = jnp.zeros((x_bte.shape[0], x_bte.shape[2], a_en.shape[1]), jnp.float32)
  y_bte, _ = chunked_scan_from_state(h0_ben, x_bte, dt_bte, a_en, b_btn, c_btn, reset_bt,
                                     chunk=chunk)
  return y_bte.astype(x_bte.dtype)


def chunked_scan_from_state(h0_ben, x_bte, dt_bte, a_en, b_btn, c_btn, reset_bt, *,
                            chunk: int = 64):
  """scan_from_state computed as selective_scan_chunked: (y float32, final state)."""
  batch, length, channels = x_bte.shape
  chunk = min(chunk, length)  # A short call (a decode step) pads to no more than itself.
  padded = -(-length // chunk) * chunk
  pad = lambda t: jnp.pad(t.astype(jnp.float32), [(0, 0), (0, padded - length)]
                          + [(0, 0)] * (t.ndim - 2))
  # Padding steps have dt = 0: decay 1 and no input, so they leave the state alone.
  x, dt, b, c = pad(x_bte), pad(dt_bte), pad(b_btn), pad(c_btn)
  reset = jnp.pad(reset_bt, ((0, 0), (0, padded - length)))
  a_en = a_en.astype(jnp.float32)
  to_chunks = lambda t: jnp.swapaxes(t.reshape(batch, padded // chunk, chunk, *t.shape[2:]), 0, 1)

  def combine(earlier, later):
    decay_1, state_1 = earlier
    decay_2, state_2 = later
    return decay_1 * decay_2, decay_2 * state_1 + state_2

  def one_chunk(h_ben, inputs):
    x_ble, dt_ble, b_bln, c_bln, reset_bl = inputs
    decay = jnp.where(reset_bl[..., None, None], 0.0, jnp.exp(dt_ble[..., None] * a_en))
    drive = (dt_ble * x_ble)[..., None] * b_bln[:, :, None, :]  # [B, L, E, N]
    decay_so_far, h_blen = jax.lax.associative_scan(combine, (decay, drive), axis=1)
    h_blen = h_blen + decay_so_far * h_ben[:, None]
    return h_blen[:, -1], jnp.einsum('blen,bln->ble', h_blen, c_bln)

  h_ben, y_cble = jax.lax.scan(one_chunk, h0_ben.astype(jnp.float32),
                               tuple(map(to_chunks, (x, dt, b, c, reset))))
  return jnp.swapaxes(y_cble, 0, 1).reshape(batch, padded, channels)[:, :length], h_ben
