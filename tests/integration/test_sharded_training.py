"""Data-parallel, FSDP and tensor-parallel layouts on 8 fake CPU devices train exactly
like one device; the compiled train step keeps activations split; the kernels run on each
device's shard."""

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import make_tiny_config
from lm import sharding
from lm.training import loop, steps

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


def test_kernels_run_on_each_devices_shard_and_match_the_whole_computation(monkeypatch):
  """Under a data x fsdp x tensor mesh the Pallas paths see only their device's rows and
  heads/channels (XLA cannot split a kernel call), and give the unsharded result."""
  from lm.models import attention, mamba
  from pallas_kernels.decode_attention import api as decode_api
  from pallas_kernels.decode_attention import reference as decode_reference
  from pallas_kernels.flash_attention import api as attention_api
  from pallas_kernels.flash_attention import reference as attention_reference
  from pallas_kernels.selective_scan import api as scan_api
  from pallas_kernels.selective_scan import reference as scan_reference

  seen = []

  def recording(kernel, implementation):
    def run(first, *args, **kwargs):
      seen.append(first.shape)
      return kernel(first, *args, **kwargs, implementation=implementation, interpret=True)
    return run

  monkeypatch.setattr(mamba.scan_api, 'selective_scan',
                      recording(scan_api.selective_scan, 'gpu'))
  monkeypatch.setattr(attention.flash_attention, 'flash_attention',
                      recording(attention_api.flash_attention, 'gpu'))
  monkeypatch.setattr(attention.decode_attention, 'decode_attention',
                      recording(decode_api.decode_attention, 'gpu'))
  keys = jax.random.split(jax.random.key(0), 8)
  batch, length, channels, state, heads, kv_heads, head_dim = 8, 16, 16, 4, 4, 2, 16
  x, dt, b, c = (jax.random.normal(keys[i], shape) for i, shape in enumerate(
      [(batch, length, channels)] * 2 + [(batch, length, state)] * 2))
  dt, a = jax.nn.softplus(dt), -jnp.exp(jax.random.normal(keys[4], (channels, state)))
  reset = jnp.zeros((batch, length), bool).at[:, 0].set(True).at[:, 9].set(True)
  q = jax.random.normal(keys[5], (batch, length, heads, head_dim))
  k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim)) for key in keys[6:])
  segment_ids = jnp.where(reset.cumsum(1) > 1, 2, 1)
  # A decode step: row b's new token (position 0 of q, k, v) goes to slot b of caches k, v.
  step = (q[:, 0], k[:, 0] + 1, v[:, 0] - 1, k, v, jnp.arange(batch))

  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  with sharding.activate(mesh):
    scan_grads = jax.jit(jax.value_and_grad(
        lambda x, dt: jnp.sum(jnp.sin(mamba.kernel_scan(x, dt, a, b, c, reset))), (0, 1)))
    attention_out = jax.jit(attention.pallas_attention)(q, k, v, segment_ids)
    decode_out = jax.jit(attention.pallas_decode_attention)(*step)
    got_scan = scan_grads(x, dt)
  want_scan = jax.value_and_grad(lambda x, dt: jnp.sum(jnp.sin(
      scan_reference.selective_scan(x, dt, a, b, c, reset))), (0, 1))(x, dt)
  want_attention = attention_reference.attention(q, k, v, segment_ids, segment_ids)

  assert (2, length, channels // 2) in seen  # Rows over data x fsdp, channels over tensor.
  assert (2, length, heads // 2, head_dim) in seen
  assert (2, heads // 2, head_dim) in seen
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5),
               got_scan, want_scan)
  np.testing.assert_allclose(attention_out, want_attention, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5),
               decode_out, decode_reference.decode_attention(*step))


@pytest.mark.parametrize('layer_pattern', [
    'attention', 'mamba'])
def test_activations_stay_split_over_the_batch_under_fsdp(layer_pattern):
  """The compiled train step of an FSDP mesh holds each device's rows only: the logical
  constraints reach XLA (flax's with_logical_constraint, given no mesh, constrained
  nothing, and XLA then gathered whole batches onto every device)."""
  from lm.training import setup as setup_lib  # pylint: disable=import-outside-toplevel
  config = make_tiny_config('/nonexistent')
  config.model.update(layer_pattern=layer_pattern, embed_dim=64, mlp_dim=96)
  config.mesh.update(data=1, fsdp=4, tensor=1)
  config.data.update(batch_size=8, seq_len=24)
  setup = setup_lib.make_setup(config, jax.devices()[:4])
  batch = {name: jax.ShapeDtypeStruct((8, 24), jnp.int32, sharding=setup.batch_sharding)
           for name in ('tokens', 'segment_ids', 'positions')}
  with sharding.activate(setup.mesh):
    text = setup.train_step.lower(setup.abstract_state, batch, steps.Frozen()).compile().as_text()
  assert re.search(r'f32\[2,24,', text)  # A device's rows...
  # ...and never more than a device's share of an activation: its 2 rows at the widest
  # width (the MLP's 96). The embedding lookup may gather the ids and give each device
  # every row of a quarter of the width ([8,24,16]), the same share.
  share = 2 * 24 * 96
  for dims in re.findall(r'f32\[8,24,([\d,]+)\]', text):
    assert 8 * 24 * math.prod(int(d) for d in dims.split(',')) <= share, dims
