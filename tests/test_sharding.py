"""Data-parallel, FSDP and tensor-parallel layouts on 8 fake CPU devices train exactly
like one device."""

import jax
import ml_collections
import numpy as np
import pytest

from conftest import make_tiny_config
from lm import sharding
from lm.errors import ConfigError
from lm.training import loop

LAYOUTS = {
    'data': dict(data=8, fsdp=1, tensor=1),
    'fsdp': dict(data=1, fsdp=8, tensor=1),
    'tensor': dict(data=4, fsdp=1, tensor=2),
    'mixed': dict(data=2, fsdp=2, tensor=2),
}


def configure(config, mesh):
  config.model.update(num_heads=4, num_kv_heads=2, head_dim=16)
  config.train.update(num_steps=3, warmup_steps=1, log_every=1, eval_every=3)
  config.mesh.update(mesh)
  return config


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory):
  config = configure(make_tiny_config(tmp_path_factory.mktemp('corpus')),
                     dict(data=1, fsdp=1, tensor=1))
  history, state = loop.train(config, str(tmp_path_factory.mktemp('one')), jax.devices()[:1])
  return config, history, state


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_sharded_training_matches_one_device(layout, one_device_run, tmp_path):
  base_config, base_history, base_state = one_device_run
  config = configure(ml_collections.ConfigDict(base_config.to_dict()), LAYOUTS[layout])
  history, state = loop.train(config, str(tmp_path), jax.devices())

  for got, want in zip(history, base_history, strict=True):
    np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-5)
  np.testing.assert_allclose(history[-1]['eval_loss'], base_history[-1]['eval_loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               state.params, base_state.params)

  # The layout really splits the weights (a replicated run would also "match").
  kernel = state.params['layer_0']['mlp']['wi_gate']['kernel']  # [embed 64, mlp 128]
  expected = {'data': (64, 128), 'fsdp': (8, 128), 'tensor': (64, 64), 'mixed': (32, 64)}
  assert kernel.addressable_shards[0].data.shape == expected[layout]
  assert len(kernel.sharding.device_set) == 8


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
