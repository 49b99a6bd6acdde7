"""Compiling for TPU slices this machine lacks (lm/aot.py, experiments/compile.py): the
real TPU compiler, from libtpu, on the CPU. What needs no compile is in
tests/unit/test_aot.py.

The TPU compiler's time grows with a program's size per chip: the notebooks' settings and
the 8B Llama compile at one layer of their width (SHALLOW), whose figures per layer
(parameters, state per chip, kernel calls) carry over to their full depth."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments.configs import default, dpo, grpo, open_models, sft, sft_lora
from lm import aot, models, sharding
from pallas_kernels.flash_attention import api as attention_api
from pallas_kernels.selective_scan import api as scan_api
from helpers import ROOT

SHALLOW = 1  # Layers of the notebooks' settings and of the 8B Llama, as compiled here.


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


def _transformer_parameters(model, num_layers: int) -> int:
  """A Transformer's parameter count from its widths: embedding (and an untied head) and
  the final norm, then per layer query, key, value and output, SwiGLU's three matrices
  and two norms."""
  assert model.layer_pattern == 'attention'
  assert not (model.qkv_bias or model.attention_out_bias or model.qk_norm)
  outer = model.vocab_size * model.embed_dim * (1 if model.tie_embeddings else 2)
  attention = model.embed_dim * model.head_dim * 2 * (model.num_heads + model.num_kv_heads)
  per_layer = attention + 3 * model.embed_dim * model.mlp_dim + 2 * model.embed_dim
  return outer + model.embed_dim + num_layers * per_layer


def _parameters_at_depth(plan, num_layers: int) -> int:
  """The parameter count of the plan's model at `num_layers`, from its abstract init
  (nothing compiled)."""
  model_config = plan.config.model.copy_and_resolve_references()
  model_config.num_layers = num_layers
  return aot.parameter_count(jax.eval_shape(lambda: models.init_variables(
      models.build(model_config), jax.random.key(0)))['params'])


@pytest.fixture(scope='module')
def notebook_plans():
  """plan(module, topology): the 'accelerator' variant of experiments/configs/MODULE (the
  notebooks' TPU settings) at SHALLOW layers, its train step compiled for the slice once
  for this module's tests."""
  plans = {}

  def plan(module, topology):
    if (module, topology) not in plans:
      config = module.get_config('accelerator')
      config.model.num_layers = SHALLOW
      plans[module, topology] = aot.plan(config, aot.target(topology))
    return plans[module, topology]
  return plan


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


@pytest.mark.parametrize('module, parts', [
    (sft_lora, ['params', 'optimizer state', 'frozen base', 'batch']),
    (dpo, ['params', 'optimizer state', 'reference params', 'batch']),
    (grpo, ['params', 'optimizer state', 'reference params', 'batch'])])
def test_each_objective_and_lora_compile_with_what_their_steps_hold(module, parts,
                                                                     notebook_plans):
  """QLoRA: the tiny model's base in int8 on 4 chips. DPO and GRPO: the notebooks'
  settings on 8 chips, the same compiles as their notebook test's."""
  if module is sft_lora:
    config = sft_lora.get_config('tiny')
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.lora.base_dtype = 'int8'
    config.train.init_from = '/runs/base'
    plan = aot.plan(config, aot.target('v5e-4'))
  else:
    plan = notebook_plans(module, 'v5e-8')
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


def test_an_8b_llama_fits_a_v5p_slice_with_fsdp():
  """llama3_8b's width at SHALLOW layers (its 32 take 15 minutes to compile): the table's
  figures per layer carry over, and the other layers add what a layer holds."""
  config = open_models.get_config('llama3_8b')
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.data.batch_size = 8
  depth = config.model.num_layers
  config.model.num_layers = SHALLOW
  plan = aot.plan(config, aot.target('v5p-16'))
  table = aot.table(plan)
  assert "v5p-16: 8 x TPU v5, 95.74 GiB HBM each; mesh {'data': 1, 'fsdp': 8" in table
  assert f'; {plan.parameters / 1e9:.2f}B parameters;' in table and 'train step: fits' in table
  model = plan.config.model
  assert plan.parameters == _transformer_parameters(model, SHALLOW)
  full = _parameters_at_depth(plan, depth)
  assert full == _transformer_parameters(model, depth) and f'{full / 1e9:.2f}B' == '8.03B'
  [train] = plan.programs
  # bf16 params and moments (3 x 2 bytes per parameter) over 8 chips.
  state = train.parts['params'] + train.parts['optimizer state']
  assert state == pytest.approx(6 * plan.parameters / 8, rel=0.01)
  assert 0 < train.total < aot.CHIPS['v5p'].hbm_bytes
  # The other layers add their state and, as remat='full' recomputes a layer in the
  # backward pass, only their input: its rows of seq_len x embed_dim per chip (float32 at
  # most).
  assert model.remat == 'full'
  per_layer = (6 * (full - plan.parameters) / (depth - SHALLOW) / 8
               + config.data.batch_size // 8 * config.data.seq_len * model.embed_dim * 4)
  assert train.total + (depth - SHALLOW) * per_layer < aot.CHIPS['v5p'].hbm_bytes


def _compile_command(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'experiments.compile', *args], cwd=ROOT,
                        capture_output=True, text=True, env=env, timeout=300)


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
    # Refused before 100,000 fake devices exhaust the memory.
    ('--topology=cpu-100000', "error: --topology='cpu-100000': at most cpu-4096"),
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
def test_the_notebooks_tpu_settings_compile_and_fit_one_tpu_host(config, topology,
                                                                 notebook_plans):
  """colab/ trains the 'accelerator' variants on a TPU runtime: bf16, FSDP over every chip,
  the Mosaic flash-attention kernel (8 layers: a call forward and one or more backward).
  Compiled at SHALLOW layers: the rest hold what a layer does."""
  module = {'default.py': default, 'sft.py': sft, 'dpo.py': dpo, 'grpo.py': grpo}[config]
  depth = module.get_config('accelerator').model.num_layers
  plan = notebook_plans(module, topology)
  table = aot.table(plan)
  assert f"mesh {{'data': 1, 'fsdp': {topology[4:]}, 'tensor': 1}}" in table
  assert 'dtype bfloat16' in table and 'train step: fits' in table
  assert plan.parameters == _transformer_parameters(plan.config.model, SHALLOW)
  full = _parameters_at_depth(plan, depth)
  assert full == _transformer_parameters(plan.config.model, depth)
  assert re.fullmatch(r'27\.\d\dM', f'{full / 1e6:.2f}M')
  calls = int(re.search(r'\| Pallas kernel calls \| (\d+) \|', table).group(1))
  assert calls >= 2 * SHALLOW
  # Were all it holds per chip per layer, the full depth would hold depth / SHALLOW times
  # as much: still within a chip's HBM.
  [train] = plan.programs
  assert depth / SHALLOW * train.total < aot.CHIPS['v5e'].hbm_bytes
