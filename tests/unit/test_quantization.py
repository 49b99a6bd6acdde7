"""Weight-only quantization (lm/quantization.py): each stored weight against qwix's
formula, the quantized model against the float one, what is refused. The command, and a
quantized run restored, sampled and evaluated: tests/integration/test_quantize_runs.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import init_model, small_model_config
from lm import quantization, sharding
from lm.errors import ConfigError

HYBRID = dict(layer_pattern='attention,mamba')  # Every quantized layer kind.
GROUP = 8  # Divides every input axis of the small model (head_dim 8).
QMAX = {'int8': 127.5, 'int4': 7.5}  # qwix's symmetric bound: qmax + 0.5.


@functools.cache
def hybrid():
  """(model, float params) of the small hybrid model."""
  return init_model(small_model_config(**HYBRID))


@functools.cache
def quantized(scheme, group=GROUP):
  """(quantized model, its params) of the hybrid model."""
  model, params = hybrid()
  quantized_model = quantization.quantize_model(model, scheme, group)
  stored_boxed = quantization.abstract_params(quantized_model)
  return quantized_model, jax.jit(
      lambda params: quantization.quantize_params(params, stored_boxed))(params)


def reference_scale(weight, num_inputs: int, group: int | None, qmax: float):
  """max|w| / qmax over each output channel's inputs (the leading `num_inputs` axes,
  flattened), or over each group of `group` consecutive ones; broadcast to w's shape."""
  inputs = int(np.prod(weight.shape[:num_inputs]))
  rows = weight.reshape((inputs // (group or inputs), group or inputs, -1))
  absmax = np.abs(rows).max(axis=1, keepdims=True)
  return np.broadcast_to(absmax / qmax, rows.shape).reshape(weight.shape)


# int4 in groups within a head of attention's out (8) and spanning two heads (16).
@pytest.mark.parametrize('scheme, group', [('int8', None), ('int4', 8), ('int4', 16)])
def test_every_stored_weight_is_within_half_a_step_of_its_scale(scheme, group):
  """|w - q scale| <= scale / 2, scale = max|w| / 127.5 per output channel (int8) or
  max|w| / 7.5 per channel and group of consecutive inputs (int4); the embedding, norms,
  output head and dt_proj stay float."""
  _, params = hybrid()
  _, stored = quantized(scheme, group or GROUP)
  flat, stored_flat = quantization.flat_weights(params), quantization.flat_weights(stored)
  seen = set()
  for path, weight in flat.items():
    leaf = stored_flat[path]
    if not quantization.is_quantized(leaf):
      assert path[-2] not in quantization.LAYERS, path
      np.testing.assert_array_equal(leaf, weight)
      continue
    seen.add(path[-2])
    assert jnp.iinfo(leaf.array.qvalue.dtype).bits == (8 if scheme == 'int8' else 4)
    weight = np.asarray(weight)
    num_inputs = 2 if path[-2] == 'out' else 1
    scale = reference_scale(weight, num_inputs, group, QMAX[scheme])
    error = np.abs(weight - np.asarray(quantization.dequantize({'w': leaf})['w']))
    # Half a step, and float32's rounding of w / scale (values up to 127.5: 2e-5 steps).
    assert np.all(error <= scale * (0.5 + 2e-5)), path
    # One stored scale per output channel and group.
    inputs = int(np.prod(weight.shape[:num_inputs]))
    assert leaf.array.scale.size == weight.size // (group or inputs), path
  assert seen == set(quantization.LAYERS)


# On this random two-layer model: int8 per channel is off by under 2% of the largest
# logit; 4 bits in groups of 8 by up to about 30% (QLoRA's base: the same bounds).
@pytest.mark.parametrize('scheme, tolerance', [('int8', 2e-2), ('int4', 0.35)])
def test_the_quantized_model_stays_near_the_float_one(scheme, tolerance):
  """On fresh random inputs: logits within `tolerance` (max error over max logit) of the
  float model's, and equal (1e-5) to the float model's on the dequantized weights (the
  weights are dequantized in each product, nothing else changes)."""
  model, params = hybrid()
  quantized_model, stored = quantized(scheme)
  forward = lambda m: jax.jit(lambda p, *x: m.apply({'params': p}, *x))  # noqa: E731
  for seed in range(3):
    tokens = jax.random.randint(jax.random.key(100 + seed), (2, 16), 0, 97)
    segments = jnp.ones((2, 16), jnp.int32).at[1, 9:].set(2)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    expected = forward(model)(params, tokens, segments, positions)
    got = forward(quantized_model)(stored, tokens, segments, positions)
    error = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
    assert error < tolerance, (seed, error)
    dequantized = forward(model)(quantization.dequantize(stored), tokens, segments, positions)
    np.testing.assert_allclose(got, dequantized, atol=1e-5, rtol=1e-5)


def test_int4_holds_a_quarter_of_float32s_bytes_in_its_block_matrices():
  _, params = hybrid()
  before = quantization.param_bytes(params)
  after = {scheme: quantization.param_bytes(quantized(scheme)[1]) for scheme in QMAX}
  assert after['int4'] < after['int8'] < before


def test_int4_scales_fit_a_mesh_that_does_not_divide_their_tiles():
  """A tiled scale has fewer entries along the input axis than the devices that split the
  weight there: that axis is kept whole, and the params go onto the mesh."""
  quantized_model, stored = quantized('int4')
  mesh = sharding.inference_mesh(32, jax.devices()[:8])  # fsdp 8; 32 / GROUP = 4 tiles.
  abstract = quantization.abstract_arrays(quantization.abstract_params(quantized_model), mesh)
  placed = jax.device_put(stored, jax.tree.map(lambda x: x.sharding, abstract))
  kernel = placed['layer_0']['attention']['query']['kernel'].array
  assert kernel.qvalue.sharding.spec[0] == 'fsdp' and kernel.scale.sharding.spec[0] is None


def test_a_group_size_that_does_not_split_a_layer_into_groups_is_named():
  config = small_model_config(**HYBRID)  # embed 32, head_dim 8 x 4 heads, mlp 48.
  assert 'dt_proj' not in quantization.present_layers(config)
  for group in (1, 4, 8, 16):
    quantization.check_groups(config, 'int4', group, '--group_size')
  quantization.check_groups(config, 'int8', 7, '--group_size')  # One scale per channel.
  with pytest.raises(ConfigError, match=r"^--group_size=32 does not divide wo's input axis"
                     r' of 48 \(int4 is quantized in tiles of it\)$'):
    quantization.check_groups(config, 'int4', 32, '--group_size')
  with pytest.raises(ConfigError, match=r"^--group_size=64 does not divide in_proj's input"):
    quantization.check_groups(small_model_config(layer_pattern='mamba'), 'int4', 64,
                              '--group_size')  # Mamba's: embed 32; dt_proj stays float.
  with pytest.raises(ConfigError, match=r"^--group_size=12 does not split out's input of 4"
                     r' heads x 8 into groups: a group lies within a head \(dividing 8\) or'
                     r' spans whole heads \(a multiple of 8 dividing 32\)$'):
    quantization.check_groups(small_model_config(**HYBRID, mlp_dim=96, embed_dim=48),
                              'int4', 12, '--group_size')
