"""Compiling for TPU slices this machine lacks (lm/aot.py, experiments/compile.py): the
real TPU compiler, from libtpu, on the CPU."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments.configs import default, dpo, grpo, open_models, sft, sft_lora
from lm import aot, objectives, sharding
from lm.errors import ConfigError
from lm.training import loop
from lm.training import setup as setup_lib, start
from pallas_kernels.flash_attention import api as attention_api
from pallas_kernels.selective_scan import api as scan_api
from helpers import ROOT



@pytest.mark.parametrize('name, chips, slices', [
    ('v5e-256', 256, 1), ('v5e-1', 1, 1), ('v6e-16', 16, 1), ('v5p-128', 64, 1),
    ('v4-8', 4, 1), ('2xv5e-256', 256, 2), ('cpu-8', 8, 1)])
def test_slice_names_give_chips_and_slices(name, chips, slices):
  assert aot.parse_topology(name)[1:] == (chips, slices)


@pytest.mark.parametrize('name, message', [
    ('v5e-3', 'v5e slices are v5e-1, v5e-4'), ('v5p-6', 'v5p slices are v5p-8, v5p-16'),
    ('v7-8', 'is not a slice name'), ('tpu', 'is not a slice name')])
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


@pytest.mark.parametrize('chip', sorted(aot.CHIPS))
def test_each_chips_hbm_is_what_the_compiler_allows(chip):
  """A program needing far more than any chip holds: the compiler's refusal names the HBM
  it has, which must be the table's."""
  name = f'{chip}-{4 * aot.CHIPS[chip].cores_per_name}'
  device = aot.target(name).devices[0]
  huge = jax.jit(lambda x: jnp.cumsum(jnp.broadcast_to(x, (2**36,))),
                 in_shardings=jax.sharding.SingleDeviceSharding(device))
  with pytest.raises(jax.errors.JaxRuntimeError, match='RESOURCE_EXHAUSTED') as error:
    huge.lower(jax.ShapeDtypeStruct((), jnp.float32)).compile()
  available = float(re.search(r'available HBM \(([\d.]+)G\)', str(error.value)).group(1))
  assert aot.CHIPS[chip].hbm_bytes / aot.GiB == pytest.approx(available, abs=0.01)


def _first_batch(config):
  """A real batch of `config`'s objective, as the loop makes it (GRPO: after a rollout)."""
  config, tokenizer = start.resolve(config, 1)
  objective = objectives.OBJECTIVES[config.train.objective]
  host_batch = next(iter(loop._datasets(config, objective, tokenizer).validation_dataset))
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


def _pallas_config(layer_pattern):
  config = default.get_config('tiny')
  config.model.update(attention='pallas', mamba_scan='pallas', layer_pattern=layer_pattern,
                      num_heads=2, num_kv_heads=1, head_dim=128)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config


@pytest.mark.parametrize('layer_pattern', ['attention', 'mamba,attention'])
def test_tiny_pallas_models_compile_for_a_v5e_slice_with_fsdp(layer_pattern):
  """The whole TPU compiler, Mosaic kernels inside the partitioned program (shard_map):
  train step, prefill and decode step, each with the kernels it should hold."""
  plan = aot.plan(_pallas_config(layer_pattern), aot.target('v5e-4'), sample_batch=4,
                  prompt_length=32, cache_length=64)
  assert plan.mesh_shape == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert [p.name for p in plan.programs] == ['train step', 'prefill 4x32',
                                             'decode step (cache 64)']
  assert plan.fits and all(p.seconds > 0 and p.xla_flops > 0 for p in plan.programs)
  train, prefill, decode = plan.programs
  # Two layers, each a kernel call forward and one or more backward; sampling runs the
  # cache's attention (XLA) and Mamba's recurrence, so holds none.
  assert train.kernel_calls >= 2 * 2 and prefill.kernel_calls == decode.kernel_calls == 0
  assert 0 < train.total < 0.1 * aot.GiB
  table = aot.table(plan)
  assert 'v5e-4: 4 x TPU v5 lite, 15.75 GiB HBM each' in table
  assert 'train step: fits' in table


def test_two_slices_compile_with_the_data_axis_across_them():
  """Devices come slice by slice, so the mesh's first axis ('data') splits over slices:
  only the gradients' all-reduce crosses between them."""
  config = default.get_config('tiny')
  config.mesh.update(data=2, fsdp=-1, tensor=1)
  target = aot.target('2xv5e-4')
  plan = aot.plan(config, target)
  assert plan.mesh_shape == {'data': 2, 'fsdp': 4, 'tensor': 1} and plan.fits
  mesh = sharding.make_mesh(plan.config.mesh, target.devices)
  assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]


@pytest.mark.parametrize('module, overrides, parts', [
    (sft_lora, {'lora.base_dtype': 'int8', 'train.init_from': '/runs/base'},
     ['params', 'optimizer state', 'frozen base', 'batch']),
    (dpo, {}, ['params', 'optimizer state', 'reference params', 'batch']),
    (grpo, {'data.batch_size': 4},
     ['params', 'optimizer state', 'reference params', 'batch'])])
def test_each_objective_and_lora_compile_with_what_their_steps_hold(module, overrides, parts):
  config = module.get_config('tiny')
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  for field, value in overrides.items():
    section, name = field.split('.')
    config[section][name] = value
  plan = aot.plan(config, aot.target('v5e-4'))
  [train] = plan.programs
  assert list(train.parts) == parts and train.fits and train.seconds > 0
  if 'frozen base' in parts:  # Adapters train, over a base stored in int8 on 4 chips.
    assert plan.trained < plan.parameters
    float32_base_per_chip = 4 * (plan.parameters - plan.trained) / 4
    assert train.parts['frozen base'] < 0.6 * float32_base_per_chip
  else:
    assert plan.trained == plan.parameters
    assert train.parts['reference params'] == train.parts['params']


def test_flash_attention_compiles_for_tpu_forward_and_backward_at_full_size():
  device = aot.target('v5e-1').devices[0]
  q = jax.ShapeDtypeStruct((2, 2048, 16, 128), jnp.bfloat16,
                           sharding=jax.sharding.SingleDeviceSharding(device))
  loss = lambda q, k, v: attention_api.flash_attention(
      q, k, v, causal=True, implementation='tpu').astype(jnp.float32).sum()
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
  assert compiled.as_text().count('tpu_custom_call') >= 3  # Forward, dq, dkv.


def test_selective_scan_compiles_for_tpu_forward_and_backward_at_full_size():
  device = aot.target('v5e-1').devices[0]
  shape = lambda *dims, dtype=jnp.float32: jax.ShapeDtypeStruct(
      dims, dtype, sharding=jax.sharding.SingleDeviceSharding(device))
  batch, length, channels, state = 4, 2048, 2048, 16
  args = (shape(batch, length, channels), shape(batch, length, channels),
          shape(channels, state), shape(batch, length, state), shape(batch, length, state),
          shape(batch, length, dtype=jnp.bool_))
  loss = lambda x, dt, a, b, c, reset: scan_api.selective_scan(
      x, dt, a, b, c, reset, implementation='tpu').sum()
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
  assert compiled.as_text().count('tpu_custom_call') >= 2  # Forward and backward.


def _llama_8b():
  config = open_models.get_config('llama3_8b')
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config


def _compile_command(*args, env=None, nice=False):
  """experiments.compile; with `nice`, at the lowest priority: the TPU compiler takes every
  core for minutes, and would starve the tests beside it (the multi-process ones time
  out)."""
  return subprocess.run(['nice', '-n', '19'] * nice
                        + [sys.executable, '-m', 'experiments.compile', *args], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=900)


def _gib(table: str, row: str) -> float:
  """A train step's figure from the command's table, in GiB."""
  value, unit = re.search(rf'\| {row} \| \**([\d.]+) (GiB|MiB)', table).groups()
  return float(value) / (1024 if unit == 'MiB' else 1)


def test_an_8b_llama_fits_a_v5p_slice_with_fsdp():
  result = _compile_command(
      '--config=experiments/configs/open_models.py:llama3_8b', '--topology=v5p-16',
      '--config.mesh.data=1', '--config.mesh.fsdp=-1', '--config.data.batch_size=8', nice=True)
  assert result.returncode == 0, result.stderr[-2000:]
  table = result.stdout
  assert "v5p-16: 8 x TPU v5, 95.74 GiB HBM each; mesh {'data': 1, 'fsdp': 8" in table
  assert '; 8.03B parameters;' in table and 'train step: fits' in table
  # bf16 params and moments (3 x 2 bytes per parameter) over 8 chips.
  state = _gib(table, 'params') + _gib(table, 'optimizer state')
  assert state == pytest.approx(6 * 8.03e9 / 8 / aot.GiB, rel=0.01)
  assert 0 < _gib(table, 'total') < 95.74


def test_an_8b_llama_does_not_fit_one_v5e_chip_and_says_why():
  plan = aot.plan(_llama_8b(), aot.target('v5e-1'))
  [train] = plan.programs
  assert not train.fits and not plan.fits
  assert train.seconds == 0  # Its state alone is over HBM: nothing to compile.
  table = aot.table(plan)
  assert re.search(r'train step: does not fit by [\d.]+ GiB per chip: its arguments alone'
                   r' need [\d.]+ GiB per chip of 15.75 GiB', table)
  assert 'try a slice of at least' in table


def test_the_compile_command_exits_0_when_it_fits_and_1_when_not():
  tiny = ['--config=experiments/configs/default.py:tiny', '--config.mesh.data=1',
          '--config.mesh.fsdp=-1']
  fits = _compile_command(*tiny, '--topology=v5e-4', '--sample_batch=4',
                          '--prompt_length=16', '--cache_length=32')
  assert fits.returncode == 0, fits.stderr
  assert '| per chip | train step | prefill 4x16 | decode step (cache 32) |' in fits.stdout
  assert 'libtpu' not in fits.stderr and 'TPU_WORKER_HOSTNAMES' not in fits.stderr
  too_big = _compile_command('--config=experiments/configs/open_models.py:llama3_8b',
                             '--topology=v5e-1')
  assert too_big.returncode == 1 and 'train step: does not fit' in too_big.stdout
  on_cpu = _compile_command(*tiny, '--topology=cpu-4')
  assert on_cpu.returncode == 0 and 'cpu-4: 4 x cpu' in on_cpu.stdout


@pytest.mark.parametrize('flag, message', [
    ('--topology=v5e-3', "error: --topology='v5e-3': v5e slices are"),
    ('--topology=h100-8', "error: --topology='h100-8' is not a slice name"),
    ('--sample_batch=-4 --topology=v5e-4', 'error: --sample_batch=-4 must be at least 0'),
    ('--notrain --topology=v5e-4', 'error: --notrain needs --sample_batch'),
])
def test_a_bad_topology_is_one_line(flag, message):
  result = _compile_command('--config=experiments/configs/default.py:tiny', *flag.split())
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message)


def test_cpu_commands_do_not_start_libtpu():
  """libtpu is installed for the compile command; a CPU run must not try a TPU first."""
  env = {name: value for name, value in os.environ.items() if name != 'JAX_PLATFORMS'}
  result = subprocess.run(
      [sys.executable, '-c', 'import lm, jax; print(jax.devices()[0].platform)'],
      cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
  assert result.stdout.strip() == 'cpu' and result.stderr == ''


@pytest.mark.parametrize('config, topology', [
    ('default.py', 'v5e-1'), ('default.py', 'v5e-8'), ('sft.py', 'v5e-8'), ('dpo.py', 'v5e-8'),
    ('grpo.py', 'v5e-8')])
def test_the_notebooks_tpu_settings_compile_and_fit_one_tpu_host(config, topology):
  """colab/ trains the 'accelerator' variants on a TPU runtime: bf16, FSDP over every chip,
  the Mosaic flash-attention kernel (8 layers: a call forward and one or more backward)."""
  result = _compile_command(f'--config=experiments/configs/{config}:accelerator',
                            f'--topology={topology}', nice=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"mesh {{'data': 1, 'fsdp': {topology[4:]}, 'tensor': 1}}" in result.stdout
  assert 'dtype bfloat16' in result.stdout and 'train step: fits' in result.stdout
  assert re.search(r'; 27\.\d\dM parameters;', result.stdout)
  calls = int(re.search(r'\| Pallas kernel calls \| (\d+) \|', result.stdout).group(1))
  assert calls >= 2 * 8
