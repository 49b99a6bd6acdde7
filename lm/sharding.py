"""Logical axis names -> mesh axes, in one table.

Modules name their dimensions ('embed', 'heads', 'act_batch', ...); this file alone
decides which mesh axis ('data', 'fsdp', 'tensor') each name is split over. Parameter
names and activation names are distinct ('embed' vs 'act_embed') because FSDP splits
the weights' embed dimension over 'fsdp' while activations split their batch over it.
"""

import contextlib
import contextvars
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')

# (logical name, mesh axis or axes or None). First match wins.
LOGICAL_AXIS_RULES = (
    # Parameters.
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('norm', None),
    ('state', None),
    ('conv_width', None),
    ('dt_rank', None),
    ('mamba_projection', None),
    # Activations.
    ('act_batch', ('data', 'fsdp')),
    ('act_seq', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_head_dim', None),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)


def resolve_mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """{'data': -1, 'fsdp': 2, 'tensor': 1} -> concrete sizes whose product is num_devices."""
  shape = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  wildcards = [axis for axis, size in shape.items() if size == -1]
  if len(wildcards) > 1:
    raise ConfigError(f'config.mesh: at most one axis may be -1, got {shape}')
  for axis, size in shape.items():
    if size == 0 or size < -1:
      raise ConfigError(f'config.mesh.{axis}={size} must be a positive size or -1')
  fixed = math.prod(size for size in shape.values() if size != -1)
  if wildcards:
    if num_devices % fixed:
      raise ConfigError(
          f'config.mesh {shape}: {num_devices} devices are not divisible by the'
          f' fixed axes (product {fixed})')
    shape[wildcards[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f'config.mesh {shape} needs {fixed} devices but {num_devices} are available;'
        ' set one axis to -1 to use all remaining devices')
  return shape


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  device_array = np.asarray(devices).reshape([shape[axis] for axis in MESH_AXES])
  return Mesh(device_array, MESH_AXES)


_ACTIVE_MESH = contextvars.ContextVar('active_mesh', default=None)


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Mesh and logical rules in scope, for tracing code that calls with_logical_constraint
  or per_shard."""
  token = _ACTIVE_MESH.set(mesh)
  try:
    with mesh, nn.logical_axis_rules(LOGICAL_AXIS_RULES):
      yield
  finally:
    _ACTIVE_MESH.reset(token)


def constrain(x, names: tuple):
  """x split over the active mesh as its logical axis `names` say; x itself without a
  mesh. The mesh is passed explicitly: flax's with_logical_constraint finds none from
  `with mesh` and would constrain nothing."""
  mesh = _ACTIVE_MESH.get()
  if mesh is None:
    return x
  return nn.with_logical_constraint(x, names, rules=LOGICAL_AXIS_RULES, mesh=mesh)


def per_shard(function, in_specs, out_specs):
  """`function` applied to each device's shard of its arguments, under the active mesh.

  For Pallas kernels: a kernel is one opaque call that XLA cannot split, so under jit it
  would gather its inputs whole onto every device. in_specs holds a PartitionSpec of
  logical axis names per argument, out_specs one per result (a pytree of them shaped as
  the results); the named dimensions must not need communication (batch, heads,
  channels). Without an active mesh of more than one device, or for arguments the mesh
  does not divide (the one-row trace of a model's init), this is `function` itself.
  """
  mesh = _ACTIVE_MESH.get()
  if mesh is None or mesh.size == 1:
    return function
  to_mesh = lambda specs: jax.tree.map(
      lambda names: nn.logical_to_mesh_axes(names, LOGICAL_AXIS_RULES), specs)
  in_mesh_specs = to_mesh(tuple(in_specs))
  sharded = jax.shard_map(function, mesh=mesh, in_specs=in_mesh_specs,
                          out_specs=to_mesh(out_specs), check_vma=False)

  def divides(array, spec) -> bool:
    for size, axes in zip(array.shape, spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      if size % math.prod(mesh.shape[axis] for axis in axes):
        return False
    return True

  def call(*args):
    if all(divides(arg, spec) for arg, spec in zip(args, in_mesh_specs)):
      return sharded(*args)
    return function(*args)
  return call


def logical_to_shardings(logical_tree, mesh: Mesh):
  """Pytree of logical PartitionSpecs (or boxed abstract values) -> NamedShardings."""
  specs = nn.get_partition_spec(logical_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def abstract_arrays(boxed, shardings):
  """Boxed abstract values (eval_shape of an init) -> ShapeDtypeStructs carrying
  `shardings` (logical_to_shardings of the same tree)."""
  return jax.tree.map(lambda value, where: jax.ShapeDtypeStruct(value.shape, value.dtype,
                                                                sharding=where),
                      nn.meta.unbox(boxed), shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """A batch's arrays ([batch, seq], or [batch] for a per-example number) split on their
  first axis over the data-parallel axes."""
  return NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))


def rows_multiple(mesh: Mesh | None = None) -> int:
  """Rows of a batch for `put_rows` must be a multiple of this (1 without a mesh)."""
  mesh = mesh or _ACTIVE_MESH.get()
  return 1 if mesh is None else mesh.shape['data'] * mesh.shape['fsdp']


def put_rows(array: np.ndarray, mesh: Mesh | None = None) -> jax.Array:
  """A host array [B, ...] every process holds whole -> one global array, rows split over
  the data-parallel axes of `mesh` (default: the active one): each process places only
  its own devices' rows, so the batch is computed once over all devices."""
  mesh = mesh or _ACTIVE_MESH.get()
  if mesh is None:
    return jax.numpy.asarray(array)
  spec = PartitionSpec(('data', 'fsdp'), *([None] * (array.ndim - 1)))
  return jax.make_array_from_callback(array.shape, NamedSharding(mesh, spec),
                                      lambda index: array[index])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_host(tree):
  """Arrays -> numpy on this process, whole: an array split over several processes'
  devices is gathered first."""
  def leaf(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
  return jax.tree.map(leaf, tree)


def inference_mesh(embed_dim: int, devices=None) -> Mesh:
  """A mesh of every device (every process's) for sampling and scoring: the params split
  over 'fsdp' as far as `embed_dim` divides (a model too big for one device still fits),
  the rest 'data'; rows split over both."""
  devices = list(jax.devices() if devices is None else devices)
  fsdp = math.gcd(embed_dim, len(devices))
  return make_mesh({'data': len(devices) // fsdp, 'fsdp': fsdp, 'tensor': 1}, devices)


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's rows of each array -> global arrays over all processes' devices."""
  return {name: jax.make_array_from_process_local_data(sharding, value)
          for name, value in batch.items()}
