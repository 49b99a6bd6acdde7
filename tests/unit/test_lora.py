"""Low-rank adapters and QLoRA (lm/lora.py): the adapted model against its base and the
paper's formula; what trains, how adapters shard, and runs that resume and merge are in
tests/integration/test_lora_runs.py."""

import functools
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import default
from helpers import small_model_config
from lm import lora, models
from lm.errors import ConfigError

HYBRID = dict(layer_pattern='attention,mamba')


def lora_config(**fields):
  config = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, dropout=0.0,
                                          targets='attention,mlp,mamba', base_dtype='',
                                          tile_size=8))
  config.update(fields)
  return config


@functools.cache
def inputs(seed=1, vocab=97, length=16):
  tokens = jax.random.randint(jax.random.key(seed), (2, length), 0, vocab)
  segments = jnp.ones((2, length), jnp.int32).at[1, length // 2:].set(2)
  positions = jnp.concatenate([jnp.arange(length)[None], jnp.concatenate(
      [jnp.arange(length // 2), jnp.arange(length // 2)])[None]])
  return tokens, segments, positions


# The tests share one hybrid model, and each program it runs is compiled once for them all:
# eager Flax would run op by op, and a jit per test would compile the same program again.
@functools.cache
def hybrid_model():
  return models.build(small_model_config(**HYBRID))


def lora_items(config, *without):
  """`config`'s fields as a key, less those named."""
  return tuple(sorted((name, value) for name, value in config.items() if name not in without))


@functools.cache
def compiled_apply(items=None):
  """params, *inputs -> logits of the hybrid model, or (`items`: a lora_config's) of the
  adapted model, compiled."""
  model = hybrid_model()
  if items is not None:
    model = lora.wrap(model, lora_config(**dict(items)), train=False)
  return jax.jit(lambda params, *inputs: model.apply({'params': params}, *inputs))


@functools.cache
def _fresh(items):
  """The adapted model's params as initialised, unquantized (the same whatever
  base_dtype)."""
  model = lora.wrap(hybrid_model(), lora_config(**dict(items)), train=False, quantize=False)
  init = jax.jit(functools.partial(models.init_variables, model, length=16))
  return nn.meta.unbox(init(jax.random.key(0))['params'])


def base_and_adapters(config):
  """(plain params, the adapted model's fresh adapters): the two halves of the adapted
  model's initial params, in containers of the caller's own."""
  return jax.tree.map(lambda x: x, lora.split(_fresh(lora_items(config, 'base_dtype'))))


def adapter_shapes(config):
  """The adapted hybrid model's adapters as boxed ShapeDtypeStructs."""
  return lora.abstract_split(hybrid_model(), config)[1]


def random_adapters(adapters, seed=3, scale=0.2):
  leaves, tree = jax.tree.flatten(adapters)
  rng = np.random.default_rng(seed)  # numpy's: no compilation for each shape.
  return tree.unflatten([jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)
                         for x in leaves])


def test_targets_name_layers_and_groups():
  assert lora.target_layers('attention, wo') == ('query', 'key', 'value', 'out', 'wo')
  assert lora.target_layers('mamba') == ('in_proj', 'out_proj')


def test_targets_that_name_no_layer_of_the_model_are_refused():
  """LoRA on the mamba projections of an attention-only model would train 0 parameters."""
  config = _lora_config(layer_pattern='attention', targets='mamba')
  with pytest.raises(ConfigError, match=re.escape(
      "config.lora.targets='mamba' names no layer of this model (layer_pattern 'attention')")):
    lora.validate(config)
  config.lora.targets = 'mamba,wo'  # One of them is there: adapters on it.
  lora.validate(config)
  config.model.layer_pattern = 'mamba,attention'
  config.lora.targets = 'mamba'
  lora.validate(config)


def test_a_rank_past_the_smaller_side_of_an_adapted_weight_is_refused():
  config = _lora_config(layer_pattern='attention', targets='attention')
  model = config.model
  smallest = min(model.embed_dim, model.num_heads * model.head_dim,
                 model.num_kv_heads * model.head_dim)
  config.lora.rank = smallest
  lora.validate(config)
  config.lora.rank = 10**6
  with pytest.raises(ConfigError, match=re.escape(
      f'config.lora.rank=1000000 exceeds {smallest}, the smaller side of the smallest weight'
      ' it adapts (query, key, value, out)')):
    lora.validate(config)


def _lora_config(layer_pattern, targets):
  config = default.get_config('tiny')
  config.model.layer_pattern = layer_pattern
  config.train.init_from = '/runs/base'
  config.lora.update(rank=4, targets=targets)
  return config


def test_adapted_model_starts_as_its_base():
  config = lora_config()
  plain, adapters = base_and_adapters(config)
  # Every target layer of both block kinds got an adapter pair.
  flat = flax.traverse_util.flatten_dict(adapters)
  layers = {key[-2] for key in flat}
  assert layers == {'query', 'key', 'value', 'out', 'wi_gate', 'wi_up', 'wo', 'in_proj',
                    'out_proj'}
  assert all(not np.any(value) for key, value in flat.items() if key[-1].endswith('_lora_b'))
  expected = compiled_apply()(plain, *inputs())
  got = compiled_apply(lora_items(config))(lora.combine(plain, adapters), *inputs())
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_adapted_layer_and_merge_follow_the_lora_formula():
  """h = x W + (alpha / r) x A B (Hu et al. 2021, eq. 3); merged: W + (alpha / r) A B."""
  config = lora_config(rank=3, alpha=5.0)
  plain, _ = base_and_adapters(lora_config())
  adapters = nn.meta.unbox(random_adapters(adapter_shapes(config)))
  merged = lora.merge(plain, adapters, config)
  # One kernel by hand: the query's [D, N, H] kernel and its [D, r] x [r, N*H] adapter.
  query = adapters['layer_0']['attention']['query']
  w = np.asarray(plain['layer_0']['attention']['query']['kernel'], np.float64)
  delta = (np.asarray(query['kernel_lora_a'], np.float64)
           @ np.asarray(query['kernel_lora_b'], np.float64)) * 5.0 / 3
  np.testing.assert_allclose(merged['layer_0']['attention']['query']['kernel'],
                             w + delta.reshape(w.shape), rtol=1e-5, atol=1e-6)
  # Layers without adapters are the base's.
  np.testing.assert_array_equal(merged['layer_1']['mixer']['x_proj']['kernel'],
                                plain['layer_1']['mixer']['x_proj']['kernel'])
  # The merged plain model computes what the adapted one does, in float32.
  expected = compiled_apply(lora_items(config))(lora.combine(plain, adapters), *inputs())
  got = compiled_apply()(merged, *inputs())
  assert float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected))) < 1e-5


# On this random two-layer model: int8 per channel is off by under 2%; 4 bits in tiles of 8
# by about a quarter of the largest logit.
@pytest.mark.parametrize('base_dtype, tolerance', [
    ('int8', 2e-2), ('nf4', 0.3),
    ('int4', 0.3)])
def test_qlora_stores_the_base_quantized_and_stays_near_it(base_dtype, tolerance):
  """Logits of the quantized base within `tolerance` (max error over max logit) of the
  float32 base's; every adapter still acts on the quantized layers."""
  config = lora_config(base_dtype=base_dtype)
  plain, adapters = base_and_adapters(config)
  stored_boxed, _ = lora.abstract_split(hybrid_model(), config)
  stored = jax.jit(lambda params: lora.quantize_base(params, stored_boxed))(plain)
  kernel = stored['layer_0']['attention']['query']['kernel']
  assert jnp.iinfo(kernel.array.qvalue.dtype).bits == (8 if base_dtype == 'int8' else 4)
  # Quantized though not adapted; the embedding stays as it was.
  assert not isinstance(stored['layer_1']['mixer']['x_proj']['kernel'], jax.Array)
  assert isinstance(stored['embed']['embedding'], jax.Array)
  adapted = compiled_apply(lora_items(config))
  expected = compiled_apply()(plain, *inputs())
  got = adapted(lora.combine(stored, adapters), *inputs())
  error = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
  assert error < tolerance
  flat = flax.traverse_util.flatten_dict(adapters)
  for key in [k for k in flat if k[-1] == 'kernel_lora_b']:
    moved = dict(flat)
    moved[key] = jnp.full_like(flat[key], 0.5)
    changed = adapted(lora.combine(stored, flax.traverse_util.unflatten_dict(moved)),
                      *inputs())
    assert float(jnp.max(jnp.abs(changed - got))) > 1e-3, key
