"""Layers shared by the model families.

Dimension letters as in lm/__init__.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import sharding

Initializer = nn.initializers.Initializer


def dense_init(names: tuple[str, ...]) -> Initializer:
  """Fan-in scaled truncated normal, boxed with logical axis names."""
  return nn.with_logical_partitioning(
      nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'), names)


class RMSNorm(nn.Module):
  """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
        (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (x32 * scale).astype(self.dtype)


# config.model.rope_scaling with no rescaling, and Llama 3.1's published settings as the
# values its 'llama3' kind starts from.
NO_ROPE_SCALING = dict(kind='none', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_len=8192)


def rope_frequencies(head_dim: int, theta: float, scaling=None):
  """RoPE's inverse frequencies [H/2]: theta^(-2i/H) (Su et al. 2021), optionally
  rescaled for long contexts. `scaling.kind` 'llama3' (Llama 3.1's published rule):
  wavelengths beyond original_max_len / low_freq_factor are stretched by `factor`, those
  under original_max_len / high_freq_factor kept, and the band between interpolated."""
  fraction = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_frequency = theta ** -fraction
  if scaling is None or scaling.kind == 'none':
    return inv_frequency
  wavelength = 2 * jnp.pi / inv_frequency
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  smooth = (scaling.original_max_len / wavelength - low) / (high - low)
  interpolated = (1 - smooth) * inv_frequency / scaling.factor + smooth * inv_frequency
  long = wavelength > scaling.original_max_len / low
  short = wavelength < scaling.original_max_len / high
  return jnp.where(long, inv_frequency / scaling.factor,
                   jnp.where(short, inv_frequency, interpolated))


def apply_rope(x_btnh, positions_bt, theta: float, scaling=None):
  """Rotary position embedding (Su et al. 2021), rotate-half form, in float32.

  Uses each token's position within its own document, so packed documents each
  start at position 0.
  """
  head_dim = x_btnh.shape[-1]
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head_dim, got {head_dim}')
  inv_frequency = rope_frequencies(head_dim, theta, scaling)  # [H/2]
  angles = positions_bt[..., None].astype(jnp.float32) * inv_frequency  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_btnh.dtype)


class MLP(nn.Module):
  """SwiGLU feed-forward (Shazeer 2020): wo(silu(x wi_gate) * (x wi_up))."""
  mlp_dim: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd):
    embed_dim = x_btd.shape[-1]
    dense = lambda features, names, name: nn.Dense(
        features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=dense_init(names), name=name)
    gate_btf = dense(self.mlp_dim, ('embed', 'mlp'), 'wi_gate')(x_btd)
    up_btf = dense(self.mlp_dim, ('embed', 'mlp'), 'wi_up')(x_btd)
    hidden_btf = nn.silu(gate_btf) * up_btf
    hidden_btf = sharding.constrain(hidden_btf, ('act_batch', 'act_seq', 'act_mlp'))
    return dense(embed_dim, ('mlp', 'embed'), 'wo')(hidden_btf)
