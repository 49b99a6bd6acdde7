"""Mamba (Gu & Dao 2023) selective state-space mixer.

Dimension letters as in lm/__init__.py (E = expand * D inner channels, P state size).

Per channel e the state h [P] follows, with input-dependent step dt, B and C (eq. 2a-2b
discretised by zero-order hold on A and Euler on B, as the paper's implementation does):
  h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,   y_t = C_t . h_t + D x_t.
A packed row restarts h (and the convolution's window) at each new segment, so a
packed row equals its documents run one by one.

Decoding (`decode=True`, 'cache' collection mutable) keeps per layer the last W-1
convolution inputs [B, W-1, E] and the state h [B, E, P]: the same interface as the
attention KV cache. A call appends T tokens to each row; padding tokens (segment id 0)
get dt = 0 and leave both states untouched.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm import sharding
from lm.models import layers
from pallas_kernels.selective_scan import api as scan_api
from pallas_kernels.selective_scan import reference


def segment_starts(segment_ids_bt):
  """True where a token begins a new segment (and at t = 0)."""
  previous_bt = jnp.pad(segment_ids_bt[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  return segment_ids_bt != previous_bt


def kernel_scan(x_bte, dt_bte, a_ep, b_btp, c_btp, reset_bt):
  """The Pallas selective scan for the backend (else the chunked scan), each device on its
  own rows and channels."""
  channels, inputs = P('act_batch', 'act_seq', 'act_mlp'), P('act_batch', 'act_seq', None)
  return sharding.per_shard(
      scan_api.selective_scan,
      (channels, channels, P('act_mlp', None), inputs, inputs, P('act_batch', 'act_seq')),
      channels)(x_bte, dt_bte, a_ep, b_btp, c_btp, reset_bt)


# Each takes (x, dt, a, b, c, reset) and returns the scan's y without the D skip
# (pallas_kernels/selective_scan/reference.py is the specification).
SCANS = {
    'reference': reference.selective_scan,  # lax.scan over time.
    'chunked': reference.selective_scan_chunked,  # Associative scan in chunks.
    'pallas': kernel_scan,
}


def causal_depthwise_conv(x_bte, kernel_we, bias_e, segment_ids_bt):
  """y_t = bias + sum_k kernel[k] x_{t-W+1+k}, taking only inputs of t's own segment."""
  width = kernel_we.shape[0]
  y_bte = jnp.zeros_like(x_bte) + bias_e
  for k in range(width):
    shift = width - 1 - k
    x_shifted = jnp.pad(x_bte, ((0, 0), (shift, 0), (0, 0)))[:, :x_bte.shape[1]]
    segment_shifted = jnp.pad(segment_ids_bt, ((0, 0), (shift, 0)), constant_values=-1)
    same_segment = (segment_shifted[:, :x_bte.shape[1]] == segment_ids_bt)[..., None]
    y_bte = y_bte + jnp.where(same_segment, x_shifted, 0.0) * kernel_we[k]
  return y_bte


def _dt_bias_init(minimum: float = 1e-3, maximum: float = 0.1):
  """Softplus-inverse of dt drawn log-uniformly in [minimum, maximum] (the paper's init)."""
  def init(rng, shape, dtype=jnp.float32):
    dt = jnp.exp(jax.random.uniform(rng, shape, dtype) * (math.log(maximum) - math.log(minimum))
                 + math.log(minimum))
    return dt + jnp.log(-jnp.expm1(-dt))
  return init


class MambaMixer(nn.Module):
  """x [B, T, D] -> [B, T, D]: in-projection to x and gate z, causal conv, selective scan,
  SiLU gating, out-projection."""
  config: object

  @nn.compact
  def __call__(self, x_btd, segment_ids_bt, positions_bt, decode: bool = False):
    del positions_bt  # Order is carried by the recurrence.
    cfg = self.config
    width, inner = cfg.embed_dim, cfg.mamba_expand * cfg.embed_dim
    state, rank, conv = cfg.mamba_state_dim, cfg.mamba_dt_rank, cfg.mamba_conv_width
    dense = lambda features, names, name, **kwargs: nn.Dense(
        features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=kwargs.pop('kernel_init', layers.dense_init(names)), name=name, **kwargs)

    xz_bte = dense(2 * inner, ('embed', 'mlp'), 'in_proj', use_bias=False)(x_btd)
    x_bte, z_bte = jnp.split(xz_bte, 2, axis=-1)
    kernel_we = self.param('conv_kernel', nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform', in_axis=0, out_axis=1),
        ('conv_width', 'mlp')), (conv, inner), jnp.float32)
    bias_e = self.param('conv_bias', nn.with_logical_partitioning(
        nn.initializers.zeros, ('mlp',)), (inner,), jnp.float32)
    if decode:
      x_bte = nn.silu(self._conv_with_cache(x_bte, kernel_we.astype(x_bte.dtype),
                                            bias_e.astype(x_bte.dtype), segment_ids_bt))
    else:
      x_bte = nn.silu(causal_depthwise_conv(x_bte, kernel_we.astype(x_bte.dtype),
                                            bias_e.astype(x_bte.dtype), segment_ids_bt))
    x_bte = sharding.constrain(x_bte, ('act_batch', 'act_seq', 'act_mlp'))

    projected = dense(rank + 2 * state, ('mlp', 'mamba_projection'), 'x_proj',
                      use_bias=False)(x_bte)
    dt_low_btr, b_btp, c_btp = jnp.split(projected, [rank, rank + state], axis=-1)
    dt_bte = nn.softplus(dense(
        inner, ('dt_rank', 'mlp'), 'dt_proj', use_bias=True,
        bias_init=nn.with_logical_partitioning(_dt_bias_init(), ('mlp',)))(dt_low_btr)
        .astype(jnp.float32))
    # A = -exp(A_log) with A_log = log(1..P) per channel (S4D-real init).
    a_log_ep = self.param('a_log', nn.with_logical_partitioning(
        lambda rng, shape, dtype: jnp.log(jnp.broadcast_to(
            jnp.arange(1, shape[1] + 1, dtype=dtype), shape)), ('mlp', 'state')),
        (inner, state), jnp.float32)
    d_e = self.param('d', nn.with_logical_partitioning(nn.initializers.ones, ('mlp',)),
                     (inner,), jnp.float32)
    if decode:
      y_bte = self._scan_with_cache(x_bte, dt_bte, -jnp.exp(a_log_ep), b_btp, c_btp,
                                    segment_ids_bt)
    else:
      y_bte = SCANS[cfg.mamba_scan](x_bte, dt_bte, -jnp.exp(a_log_ep), b_btp, c_btp,
                                    segment_starts(segment_ids_bt))
    y_bte = (y_bte.astype(jnp.float32) + x_bte.astype(jnp.float32) * d_e).astype(x_bte.dtype)
    y_bte = y_bte * nn.silu(z_bte)
    return dense(width, ('mlp', 'embed'), 'out_proj', use_bias=False)(y_bte)

  def _conv_with_cache(self, x_bte, kernel_we, bias_e, segment_ids_bt):
    """The convolution continued from the cached last W-1 inputs of each row."""
    width = kernel_we.shape[0]
    batch, length, inner = x_bte.shape
    conv_state = self.variable('cache', 'conv_state', jnp.zeros, (batch, width - 1, inner),
                               x_bte.dtype)
    x_ext = jnp.concatenate([conv_state.value, x_bte], axis=1)  # [B, W-1+T, E]
    y_bte = bias_e + sum(x_ext[:, k:k + length] * kernel_we[k] for k in range(width))
    # The new window ends at each row's last real token.
    valid_b = jnp.sum(segment_ids_bt != 0, axis=1)
    conv_state.value = jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(
        row, start, width - 1, axis=0))(x_ext, valid_b)
    return y_bte

  def _scan_with_cache(self, x_bte, dt_bte, a_ep, b_btp, c_btp, segment_ids_bt):
    batch, _, inner = x_bte.shape
    ssm_state = self.variable('cache', 'ssm_state', jnp.zeros, (batch, inner, a_ep.shape[1]),
                              jnp.float32)
    dt_bte = jnp.where((segment_ids_bt != 0)[..., None], dt_bte, 0.0)  # Padding: no change.
    never_bt = jnp.zeros(segment_ids_bt.shape, jnp.bool_)
    # Parallel over the call's tokens, so a long prompt's prefill is not T serial steps.
    y_bte, ssm_state.value = reference.chunked_scan_from_state(
        ssm_state.value, x_bte, dt_bte, a_ep, b_btp, c_btp, never_bt)
    return y_bte


class MambaBlock(nn.Module):
  """Pre-norm residual block: x + mixer(norm(x))."""
  config: object

  @nn.compact
  def __call__(self, x_btd, segment_ids_bt, positions_bt, decode: bool = False):
    cfg = self.config
    h_btd = layers.RMSNorm(cfg.norm_eps, cfg.dtype, name='mixer_norm')(x_btd)
    x_btd = x_btd + MambaMixer(cfg, name='mixer')(h_btd, segment_ids_bt, positions_bt, decode)
    return sharding.constrain(x_btd, ('act_batch', 'act_seq', 'act_embed'))


def flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token of one Mamba block: 6 per matmul weight, plus the scan's
  few multiply-adds per state element (3x for forward + backward); no term in T."""
  del seq_len
  inner = cfg.mamba_expand * cfg.embed_dim
  weights = (cfg.embed_dim * 2 * inner + inner * (cfg.mamba_dt_rank + 2 * cfg.mamba_state_dim)
             + cfg.mamba_dt_rank * inner + inner * cfg.embed_dim)
  return 6 * weights + 3 * 6 * inner * cfg.mamba_state_dim + 6 * cfg.mamba_conv_width * inner
