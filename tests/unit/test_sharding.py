"""How parameters and meshes are laid out on 8 fake CPU devices: the rules table, the mesh
shapes refused. Training on each layout, the compiled step's activations and the kernels
on each device's shard are in tests/integration/test_sharded_training.py."""

import math

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec

from helpers import small_model_config
from lm import models, sharding
from lm.errors import ConfigError


def test_one_mesh_axis_takes_the_remaining_devices():
  shape = sharding.resolve_mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8)
  assert shape == {'data': 2, 'fsdp': 2, 'tensor': 2}


@pytest.mark.parametrize('mesh,message', [
    (dict(data=3, fsdp=1, tensor=1), 'needs 3 devices but 8 are available'),
    (dict(data=-1, fsdp=3, tensor=1), 'not divisible'),
    (dict(data=-1, fsdp=-1, tensor=1), 'at most one axis may be -1'),
    (dict(data=0, fsdp=1, tensor=1), 'config.mesh.data=0'),
])
def test_a_mesh_that_does_not_fit_the_devices_is_refused(mesh, message):
  with pytest.raises(ConfigError, match=message):
    sharding.resolve_mesh_shape(mesh, 8)


# The parameter dimensions big enough to split: each must go to a mesh axis.
SPLIT_PARAMETER_AXES = ('vocab', 'embed', 'heads', 'kv_heads', 'mlp')


def test_every_parameter_is_laid_out_as_the_rules_table_says():
  """Each weight's PartitionSpec, on a mesh where every axis is > 1, is its logical names
  looked up in LOGICAL_AXIS_RULES (first match), and the names of the large dimensions
  map to real mesh axes, so no rule can quietly turn into None (replicated)."""
  rules = {}
  for name, axes in sharding.LOGICAL_AXIS_RULES:
    rules.setdefault(name, axes)
  for name in SPLIT_PARAMETER_AXES:
    axes = (rules[name],) if isinstance(rules.get(name), str) else rules.get(name)
    assert axes and set(axes) <= set(sharding.MESH_AXES), f'{name!r} -> {rules.get(name)!r}'

  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  model = models.build(small_model_config(layer_pattern='mamba,attention', vocab_size=96))
  # Rows for the data x fsdp split of the scan.
  init = lambda rng: models.init_variables(model, rng, batch_size=4, length=16)['params']
  with sharding.activate(mesh):
    boxed = jax.eval_shape(init, jax.random.key(0))
    params = jax.jit(lambda rng: nn.meta.unbox(init(rng)),
                     out_shardings=sharding.logical_to_shardings(boxed, mesh))(jax.random.key(0))

  used = set()
  flat_boxed = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  for (path, boxed_leaf), param in zip(flat_boxed, jax.tree.leaves(params), strict=True):
    where = jax.tree_util.keystr(path)
    assert isinstance(boxed_leaf, nn.Partitioned), f'{where} has no logical axis names'
    assert all(name in rules for name in boxed_leaf.names), (where, boxed_leaf.names)
    used.update(boxed_leaf.names)
    want = PartitionSpec(*(rules[name] for name in boxed_leaf.names))
    assert param.sharding.spec == want, (where, boxed_leaf.names, param.sharding.spec)
    # And the arrays are split so: each dimension over the product of its axes' sizes.
    split = [math.prod(mesh.shape[axis] for axis in ((axes,) if isinstance(axes, str) else
                                                     axes or ()))
             for axes in want]
    assert param.addressable_shards[0].data.shape == tuple(
        size // parts for size, parts in zip(param.shape, split)), where
  assert set(SPLIT_PARAMETER_AXES) <= used  # The model uses each name tested above.
