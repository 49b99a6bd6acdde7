"""lm/aot.py without compiling: slice names, a slice's devices (from libtpu's topology
description), the batch shapes a compile uses, and a state over HBM refused before the
compiler runs. The compiles are in tests/integration/test_aot_compiles.py."""

import re

import jax
import pytest

from experiments.configs import default, dpo, grpo, open_models, sft
from lm import aot, objectives
from lm.errors import ConfigError
from lm.training import loop
from lm.training import setup as setup_lib, start


@pytest.mark.parametrize('name, chips, slices', [
    ('v5e-256', 256, 1), ('v5e-1', 1, 1), ('v6e-16', 16, 1), ('v5p-128', 64, 1),
    ('v4-8', 4, 1), ('2xv5e-256', 256, 2), ('cpu-8', 8, 1)])
def test_slice_names_give_chips_and_slices(name, chips, slices):
  assert aot.parse_topology(name)[1:] == (chips, slices)


@pytest.mark.parametrize('name, message', [
    ('v5e-3', 'v5e slices are v5e-1, v5e-4'), ('v5p-6', 'v5p slices are v5p-8, v5p-16'),
    ('v7-8', 'is not a slice name'), ('tpu', 'is not a slice name'),
    ('cpu-100000', 'at most cpu-4096, the chips of the largest slice')])
def test_bad_slice_names_are_refused_naming_the_flag(name, message):
  with pytest.raises(ConfigError, match=f'--topology={name!r}.*{message}'):
    aot.parse_topology(name)


@pytest.mark.parametrize('name, devices, kind', [
    ('v5e-4', 4, 'TPU v5 lite'), ('v5p-16', 8, 'TPU v5'), ('v4-8', 4, 'TPU v4'),
    ('v6e-4', 4, 'TPU v6 lite'), ('2xv5e-4', 8, 'TPU v5 lite')])
def test_a_slice_has_its_chips_as_devices(name, devices, kind):
  found = aot.target(name).devices
  assert len(found) == devices and {d.device_kind for d in found} == {kind}
  assert {d.platform for d in found} == {'tpu'}


def _first_batch(config):
  """A real batch of `config`'s objective, as the loop makes it (GRPO: after a rollout)."""
  config, tokenizer = start.resolve(config, 1)
  objective = objectives.OBJECTIVES[config.train.objective]
  host_batch = next(iter(loop.datasets(config, objective, tokenizer).validation_dataset))
  rollout = objective.make_rollout(setup := setup_lib.make_setup(config, jax.devices()[:1]),
                                   tokenizer, config)
  if rollout is None:
    return host_batch
  params = setup.init(jax.random.key(0)).params
  return rollout(params, host_batch, 0, train=True)[0]


@pytest.mark.parametrize('module, updates_per_rollout', [
    (default, 1), (sft, 1), (dpo, 1), (grpo, 1), (grpo, 2)])
def test_batch_shapes_are_those_of_a_real_batch(module, updates_per_rollout):
  config = module.get_config('tiny')
  config.data.validation_fraction = 0.3
  config.model.dtype = 'float32'
  config.train.grpo.updates_per_rollout = updates_per_rollout
  config.checkpoint.every_steps = 2
  batch = _first_batch(config)
  want = objectives.OBJECTIVES[config.train.objective].batch_shapes(config)
  assert sorted(want) == sorted(batch)
  for name, shape in want.items():
    assert (shape.shape, shape.dtype) == (batch[name].shape, batch[name].dtype), name


def _llama_8b():
  config = open_models.get_config('llama3_8b')
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config


def test_an_8b_llama_does_not_fit_one_v5e_chip_and_says_why():
  plan = aot.plan(_llama_8b(), aot.target('v5e-1'))
  [train] = plan.programs
  assert not train.fits and not plan.fits
  assert train.seconds == 0  # Its state alone is over HBM: nothing to compile.
  table = aot.table(plan)
  assert re.search(r'train step: does not fit by [\d.]+ GiB per chip: its arguments alone'
                   r' need [\d.]+ GiB per chip of 15.75 GiB', table)
  assert 'try a slice of at least' in table
