"""Lowering a kernel for hardware this machine lacks, with jax.export: a kernel its
hardware's compiler front end (Triton, Mosaic) cannot take fails on the CPU."""

import contextlib
import inspect

import jax

# Kernel name -> (platform, the custom call each kernel becomes, the checks jax.export
# must skip for it: the Triton call's serialization is not guaranteed stable).
LOWERINGS = {
    'gpu': ('cuda', '__gpu$xla.gpu.triton',
            [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]),
    'tpu': ('tpu', 'tpu_custom_call', []),
    'mosaic_gpu': ('cuda', 'mosaic_gpu_v2', []),
}


def _target(kernel):
  """jax 0.11 lowers Triton for a named GPU; on a machine without one, name the H100
  through an abstract mesh (jax 0.10 needs nothing)."""
  if LOWERINGS[kernel][0] != 'cuda' or 'abstract_device' not in inspect.signature(
      jax.sharding.AbstractMesh).parameters:
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind='NVIDIA H100 80GB HBM3', num_cores=132,
                                       platform='cuda')
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ('x',), abstract_device=device))


def count_kernel_calls(kernel, function, *shapes) -> int:
  """Exports jit(function) for the kernel's platform; returns how many kernel calls the
  module holds."""
  platform, custom_call, disabled_checks = LOWERINGS[kernel]
  with _target(kernel):
    exported = jax.export.export(jax.jit(function), platforms=(platform,),
                                 disabled_checks=disabled_checks)(*shapes)
  return exported.mlir_module().count(custom_call)
