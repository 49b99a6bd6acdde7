"""Compiling ahead of time for devices this machine lacks: a config's train step, and its
sampling steps, built for a TPU slice (or N fake CPU devices) and compiled without
running, for the memory per chip and the FLOPs the compiler sees
(`python -m experiments.compile`).

With libtpu installed (`pip install -e ".[tpu]"`), jax.experimental.topologies gives the
devices of any TPU slice, and jit(...).lower(shapes).compile() runs the real TPU compiler
for them on the CPU, Mosaic kernels included: what fails there (a kernel over its VMEM,
an illegal layout, a program over HBM) fails on the pod.
"""

import contextlib
import dataclasses
import math
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections

from lm import flops, models, sampling, sharding
from lm.errors import ConfigError, check
from lm.training import checkpointing
from lm.training import setup as setup_lib, start as start_lib, steps
from pallas_kernels import dispatch

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation as the compiler models it."""
  kind: str  # device_kind.
  hbm_bytes: int  # What the compiler lets a program use per chip (reported when it runs out).
  cores_per_name: int  # Slice names count TensorCores: a v4-8 or v5p-8 has 4 chips.
  shapes: dict  # Chips -> the slice's chip grid.
  chip_config: str = 'default'


_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
            128: (8, 16), 256: (16, 16)}
_GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
            128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
            2048: (8, 16, 16), 4096: (16, 16, 16)}

CHIPS = {
    'v4': Chip('TPU v4', int(30.75 * GiB), 2, _GRID_3D, chip_config='megacore'),
    'v5e': Chip('TPU v5 lite', int(15.75 * GiB), 1, _GRID_2D),
    'v5p': Chip('TPU v5', int(95.74 * GiB), 2, _GRID_3D),
    'v6e': Chip('TPU v6 lite', int(31.25 * GiB), 1, _GRID_2D),
}

_TOPOLOGY = re.compile(r'(?:(?P<slices>\d+)x)?(?P<chip>v4|v5e|v5p|v6e)-(?P<size>\d+)$')


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # As given: 'v5e-256', '2xv5p-128', 'cpu-8'.
  devices: list
  hbm_bytes: int | None  # Per device; None for CPU devices (no limit checked).
  platform: str  # 'tpu' or 'cpu': which kernels the program holds.


def parse_topology(name: str) -> tuple[str, int, int]:
  """'v5e-256' -> ('v5e', 256 chips, 1 slice); '2xv5p-128' -> ('v5p', 64, 2); 'cpu-8' ->
  ('cpu', 8, 1). Raises ConfigError naming --topology."""
  if name.startswith('cpu-') and name[4:].isdigit() and int(name[4:]) > 0:
    # Each fake CPU device costs memory before anything compiles: no more than the largest
    # slice the table knows (4,096 of them take 0.7 GB).
    largest = max(max(chip.shapes) for chip in CHIPS.values())
    check(int(name[4:]) <= largest, f'--topology={name!r}: at most cpu-{largest}, the chips'
          ' of the largest slice')
    return 'cpu', int(name[4:]), 1
  match = _TOPOLOGY.match(name)
  check(match is not None,
        f'--topology={name!r} is not a slice name such as v5e-256, v5p-128, v4-64, v6e-16,'
        f' 2xv5e-256 (two slices) or cpu-8')
  chip = CHIPS[match['chip']]
  size = int(match['size'])
  chips = size // chip.cores_per_name
  check(size % chip.cores_per_name == 0 and chips in chip.shapes,
        f'--topology={name!r}: {match["chip"]} slices are '
        + ', '.join(f'{match["chip"]}-{n * chip.cores_per_name}' for n in chip.shapes))
  slices = int(match['slices'] or 1)
  check(slices >= 1, f'--topology={name!r}: the number of slices must be at least 1')
  return match['chip'], chips, slices


@contextlib.contextmanager
def _quiet_stderr():
  """libtpu prints start-up errors (no TPU here, no worker hostnames) on loading; they are
  shown only if loading fails."""
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      capture.seek(0)
      os.write(2, capture.read())
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def target(name: str) -> Target:
  """The devices of --topology `name`. CPU devices are this process's (cpu-N needs
  --xla_force_host_platform_device_count=N before JAX starts: experiments/compile.py)."""
  chip_name, chips, slices = parse_topology(name)
  if chip_name == 'cpu':
    devices = jax.devices('cpu')
    check(len(devices) >= chips, f'--topology={name}: this process has {len(devices)} CPU'
                                 ' devices')
    return Target(name, devices[:chips], None, 'cpu')
  if jax.default_backend() != 'tpu':
    # Compiling only: several processes may load libtpu at once (pytest's workers).
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    with _quiet_stderr():
      chip = CHIPS[chip_name]
      grid = chip.shapes[chips]
      host = tuple(min(size, bound) for size, bound in zip(grid + (1,) * (3 - len(grid)),
                                                          (2, 2, 1)))
      description = topologies.get_topology_desc(
          platform='tpu', topology_name=f'{chip_name}:{"x".join(map(str, grid))}',
          chip_config_name=chip.chip_config, chips_per_host_bounds=host, num_slices=slices)
  except (ImportError, RuntimeError, jax.errors.JaxRuntimeError) as error:
    raise ConfigError(
        f'--topology={name}: the TPU compiler did not start ({str(error).splitlines()[0]});'
        ' it comes with libtpu: pip install -e ".[tpu]"') from None
  return Target(name, list(description.devices), chip.hbm_bytes, 'tpu')


# --- What a compiled program holds per chip. ---


def bytes_per_device(tree) -> int:
  """Bytes of one device's shards of ShapeDtypeStructs carrying shardings (4-bit types
  counted packed)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jax.dtypes.itemsize_bits(leaf.dtype) // 8
  return total


def parameter_count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass
class Program:
  """One compiled program's figures per device (bytes), or why it does not fit."""
  name: str
  parts: dict  # What its arguments hold, by name -> bytes per device.
  hbm_bytes: int | None
  seconds: float = 0.0
  temporaries: int = 0  # Activations and XLA's temporaries.
  code: int = 0
  total: int = 0
  xla_flops: float | None = None  # Per device, from the compiler's cost analysis.
  lm_flops: float | None = None  # Per device, lm's count (lm/flops.py) of the same work.
  kernel_calls: int = 0  # Pallas (Mosaic TPU) kernel calls in the compiled program.
  failure: str = ''  # The compiler's reason (out of memory), or the state's alone.

  @property
  def fits(self) -> bool:
    return not self.failure and (self.hbm_bytes is None or self.total <= self.hbm_bytes)


def compile_program(name: str, jitted, args: tuple, parts: dict, target_: Target,
                    lm_flops: float | None = None) -> Program:
  """Lowers and compiles `jitted` at `args` (ShapeDtypeStructs with shardings) for the
  target's devices; `parts` names what the arguments hold. A program whose arguments
  alone exceed HBM is reported without compiling."""
  program = Program(name, parts, target_.hbm_bytes, lm_flops=lm_flops)
  held = sum(parts.values())
  if program.hbm_bytes is not None and held > program.hbm_bytes:
    program.total = held
    program.failure = (f'its arguments alone need {held / GiB:.2f} GiB per chip of'
                       f' {program.hbm_bytes / GiB:.2f} GiB')
    return program
  start = time.perf_counter()
  try:
    with dispatch.target(target_.platform):
      compiled = jitted.lower(*args).compile()
  except jax.errors.JaxRuntimeError as error:
    message = str(error).splitlines()[0]
    if 'RESOURCE_EXHAUSTED' not in message:
      raise
    program.seconds = time.perf_counter() - start
    program.failure = re.sub(r'^RESOURCE_EXHAUSTED: ', '', message)
    needed = re.search(r'required for HLO temporaries \(([\d.]+)G\)', message)
    program.temporaries = int(float(needed.group(1)) * GiB) if needed else 0
    program.total = held + program.temporaries
    return program
  program.seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  if memory is not None:
    program.temporaries = memory.temp_size_in_bytes
    program.code = memory.generated_code_size_in_bytes
    program.total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                     - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                     + memory.generated_code_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  program.xla_flops = (cost or {}).get('flops')
  program.kernel_calls = compiled.as_text().count('custom_call_target="tpu_custom_call"')
  return program


# --- The programs of a config. ---


@dataclasses.dataclass
class Plan:
  """What `experiments.compile` prints: a config's programs on a target."""
  config: ml_collections.ConfigDict  # Resolved (dtype, mesh sizes).
  target: Target
  mesh_shape: dict
  parameters: int
  trained: int
  programs: list

  @property
  def fits(self) -> bool:
    return all(program.fits for program in self.programs)


def resolve(config, target_: Target):
  """A checked copy of `config` for the target's devices (dtype as there)."""
  with dispatch.target(target_.platform):
    return start_lib.resolve(config, len(target_.devices))[0]


def train_program(config, target_: Target) -> tuple[Program, int, int]:
  """The config's train step (its objective, LoRA or not), compiled; the model's
  parameter count, and how many of them train (LoRA: the adapters)."""
  setup = setup_lib.make_setup(config, target_.devices)
  objective = setup.objective
  batch = {name: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=setup.batch_sharding)
           for name, shape in objective.batch_shapes(config).items()}
  state = setup.abstract_state
  parts = {'params': bytes_per_device(state.params),
           'optimizer state': bytes_per_device(state.opt_state)}
  reference = None
  if objective.needs_reference(config.train):
    reference = state.params
    parts['reference params'] = bytes_per_device(reference)
  base = None
  if setup.base is not None:
    base = setup.base.abstract
    parts['frozen base'] = bytes_per_device(base)
  parts['batch'] = bytes_per_device(batch)
  rows = config.data.batch_size * objective.rows_per_example(config.train)
  # Forward and backward of the trained model, plus the reference's forward (a third).
  passes = 1 + (1 / 3 if reference is not None else 0)
  lm_flops = (flops.flops_per_token(config.model, config.data.seq_len) * passes * rows
              * config.data.seq_len / len(target_.devices))
  with sharding.activate(setup.mesh):
    program = compile_program('train step', setup.train_step,
                              (state, batch, steps.Frozen(base=base, reference=reference)),
                              parts, target_, lm_flops)
  trained = parameter_count(state.params)
  params = trained + (parameter_count(setup.base.checkpoint_abstract) if base else 0)
  return program, params, trained


def sampling_programs(config, target_: Target, batch_size: int, prompt_length: int,
                      cache_length: int) -> list[Program]:
  """Prefill of [batch_size, prompt_length] prompts into a cache of `cache_length` slots,
  and one decode step, on the mesh sampling uses (lm.sharding.inference_mesh)."""
  check(0 < prompt_length <= cache_length <= config.model.max_seq_len,
        f'--prompt_length={prompt_length} and --cache_length={cache_length} must satisfy'
        f' 0 < prompt_length <= cache_length <= config.model.max_seq_len='
        f'{config.model.max_seq_len}')
  mesh = sharding.inference_mesh(config.model.embed_dim, target_.devices)
  check(batch_size % sharding.rows_multiple(mesh) == 0,
        f'--sample_batch={batch_size} must be a multiple of {sharding.rows_multiple(mesh)}'
        ' (the data-parallel devices of the sampling mesh)')
  model = models.build(config.model)
  params = checkpointing.abstract_params(model, mesh)
  with sharding.activate(mesh):
    cache_shapes = jax.eval_shape(lambda: sampling.init_cache(model, batch_size, cache_length))
  rows = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(('data', 'fsdp'), *([None] * (len(shape) - 1)))))
  # The cache's arrays have the batch first; each device keeps its rows' slots.
  cache = jax.tree.map(lambda x: rows(x.shape, x.dtype), cache_shapes)

  dtype = model.config.dtype
  prefill = lambda params, tokens_bt, lengths_b: sampling.prefill(
      model, sampling.cast_weights(params, dtype), tokens_bt, lengths_b, cache_length)
  decode = lambda params, cache, token_b, position_b: sampling.decode_step(
      model, sampling.cast_weights(params, dtype), cache, token_b, position_b)

  weights = bytes_per_device(params)
  tokens = rows((batch_size, prompt_length), jnp.int32)
  per_row = rows((batch_size,), jnp.int32)
  # Forward only, a third of training's; a decode step's token attends to every cache
  # slot, twice the causal average over that length.
  forward = lambda length: (flops.flops_per_token(config.model, length) / 3 * batch_size
                            / len(target_.devices))
  with sharding.activate(mesh):
    return [
        compile_program(f'prefill {batch_size}x{prompt_length}', jax.jit(prefill),
                        (params, tokens, per_row),
                        {'params': weights, 'batch': bytes_per_device((tokens, per_row))},
                        target_, forward(prompt_length) * prompt_length),
        compile_program(f'decode step (cache {cache_length})',
                        jax.jit(decode, donate_argnums=1), (params, cache, per_row, per_row),
                        {'params': weights, 'cache': bytes_per_device(cache),
                         'batch': bytes_per_device((per_row, per_row))},
                        target_, forward(2 * cache_length)),
    ]


def plan(config, target_: Target, *, train: bool = True, sample_batch: int = 0,
         prompt_length: int = 0, cache_length: int = 0) -> Plan:
  """Compiles the config's train step (if `train`) and, with `sample_batch`, its
  sampling steps for the target; nothing runs. Raises ConfigError for a bad config."""
  check(train or sample_batch, '--notrain needs --sample_batch: nothing to compile')
  check(sample_batch >= 0, f'--sample_batch={sample_batch} must be at least 0 (0: none)')
  config = resolve(config, target_)
  mesh_shape = sharding.resolve_mesh_shape(config.mesh, len(target_.devices))
  programs, parameters, trained = [], 0, 0
  with dispatch.target(target_.platform):
    if train:
      program, parameters, trained = train_program(config, target_)
      programs.append(program)
    if sample_batch:
      programs += sampling_programs(config, target_, sample_batch, prompt_length,
                                    cache_length)
  if not parameters:
    parameters = parameter_count(jax.eval_shape(
        lambda: models.init_variables(models.build(config.model), jax.random.key(0)))['params'])
    trained = parameters
  return Plan(config, target_, mesh_shape, parameters, trained, programs)


# --- Reading a plan. ---


def advice(plan_: Plan, program: Program) -> list[str]:
  """Settings that would shrink a train step that does not fit, with what they change."""
  config, devices = plan_.config, len(plan_.target.devices)
  shape, hints = plan_.mesh_shape, []
  state = sum(value for name, value in program.parts.items() if name != 'batch')
  if shape['fsdp'] < devices // shape['tensor']:
    spread = state * shape['fsdp'] / (devices // shape['tensor'])
    hints.append(f'config.mesh.fsdp=-1 config.mesh.data=1: params and optimizer state split'
                 f' over all {devices // shape["tensor"]} chips ({state / GiB:.2f} ->'
                 f' {spread / GiB:.2f} GiB per chip)')
  if program.name == 'train step':
    if config.model.remat == 'none':
      hints.append('config.model.remat=full (or save_dots): recompute activations in the'
                   ' backward pass instead of keeping them')
    rows = config.data.batch_size // (shape['data'] * shape['fsdp'])
    accumulation = config.train.grad_accumulation_steps
    if rows // accumulation > 1:
      hints.append(f'config.train.grad_accumulation_steps={rows}: activations of one row per'
                   f' chip at a time instead of {rows // accumulation}')
  hbm = plan_.target.hbm_bytes
  if hbm and state > 0.8 * hbm:
    needed = math.ceil(state * devices / (0.8 * hbm))
    hints.append(f'a slice of at least {needed} chips (or LoRA, config.lora.rank): the'
                 f' state alone is {state / GiB:.2f} GiB per chip')
  return hints


def _size(count: int) -> str:
  for unit, scale in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if count >= scale:
      return f'{count / scale:.2f}{unit}'
  return str(count)


def table(plan_: Plan) -> str:
  """The plan as a Markdown table, a column per program, and a verdict per program."""
  target_, programs = plan_.target, plan_.programs
  hbm = target_.hbm_bytes
  device = target_.devices[0].device_kind
  lines = [f'{target_.name}: {len(target_.devices)} x {device}'
           + (f', {hbm / GiB:.2f} GiB HBM each' if hbm else '')
           + f'; mesh {plan_.mesh_shape}; {_size(plan_.parameters)} parameters'
           + (f' ({_size(plan_.trained)} trained)' if plan_.trained != plan_.parameters else '')
           + ';'
           f' dtype {plan_.config.model.dtype}, remat {plan_.config.model.remat},'
           f' attention {plan_.config.model.attention}',
           '', '| per chip | ' + ' | '.join(p.name for p in programs) + ' |',
           '|---|' + '---|' * len(programs)]
  names = []
  for program in programs:
    names += [name for name in program.parts if name not in names]
  gib = lambda value: (f'{value / GiB:.2f} GiB' if value >= GiB / 10
                       else f'{value / 2**20:.2f} MiB')
  for name in names:
    lines.append(f'| {name} | ' + ' | '.join(
        gib(p.parts[name]) if name in p.parts else '' for p in programs) + ' |')
  lines.append('| activations and temporaries | ' + ' | '.join(
      gib(p.temporaries) if p.seconds else 'not compiled' for p in programs) + ' |')
  lines.append('| total | ' + ' | '.join(
      f'**{gib(p.total)}**' + (f' ({p.total / hbm:.0%} of HBM)' if hbm else '')
      for p in programs) + ' |')
  lines.append('| FLOPs (XLA) | ' + ' | '.join(
      f'{p.xla_flops:.3g}' if p.xla_flops else '' for p in programs) + ' |')
  lines.append('| FLOPs (lm, matmuls) | ' + ' | '.join(
      (f'{p.lm_flops:.3g}' + (f' (XLA/lm {p.xla_flops / p.lm_flops:.2f})' if p.xla_flops
                               else '')) if p.lm_flops else '' for p in programs) + ' |')
  lines.append('| Pallas kernel calls | ' + ' | '.join(
      str(p.kernel_calls) if p.seconds else '' for p in programs) + ' |')
  lines.append('| compile time | ' + ' | '.join(
      f'{p.seconds:.1f} s' if p.seconds else '' for p in programs) + ' |')
  lines.append('')
  for program in programs:
    if program.fits:
      lines.append(f'{program.name}: fits' + (
          f' ({(hbm - program.total) / GiB:.2f} GiB to spare per chip)' if hbm else ''))
      continue
    over = (f' by {(program.total - hbm) / GiB:.2f} GiB per chip'
            if hbm and program.total > hbm else '')
    lines.append(f'{program.name}: does not fit{over}: {program.failure}')
    lines += [f'  try {hint}' for hint in advice(plan_, program)]
  return '\n'.join(lines)
