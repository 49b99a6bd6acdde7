"""Selective-scan speed, forward and forward+backward, as a table.

  python -m pallas_kernels.benchmarks.selective_scan        # docs/anchors.md shape, on a GPU
  python -m pallas_kernels.benchmarks.selective_scan --kernel_blocks=16:8:2,8:8:1:atomic_sums=1
      # our kernel at several GPU BlockSizes (block_e:chunk:num_warps, then any field as
      # name=value), for tuning
  python -m pallas_kernels.benchmarks.selective_scan --shape=1:64:16:4 --interpret
      # a smoke run on CPU

Shape B:T:E:P (batch, time, channels, state size; the letters of lm/__init__.py).
"floor" is the time to read x, dt, B, C, A once and write y once at --bandwidth. "wall"
is the median of --repeats calls after one warm-up, each waited for, so it includes the
host's dispatch; "device" is the kernel time per call from a profiler trace of --repeats
calls (blank on the CPU, which reports no kernels). GB/s and "/ floor" use the device
time where there is one. "max rel err" is the largest relative error (max |got - want| /
max |want|) of y and the five gradients against the lax.scan reference on the same inputs.
"""

import functools

from absl import app, flags
import jax
import jax.numpy as jnp

from pallas_kernels.benchmarks import timing
from pallas_kernels.selective_scan import api, gpu, reference, tpu

_SHAPE = flags.DEFINE_string('shape', '4:2048:2048:16', 'B:T:E:P.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'dtype of x, B, C (dt, A and the state are float32).')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed runs per case.')
_INTERPRET = flags.DEFINE_bool('interpret', False, 'Run our kernel in interpret mode (CPU).')
_KERNEL_BLOCKS = flags.DEFINE_list(
    'kernel_blocks', [], 'Block sizes to time, GPU block_e:chunk:num_warps (TPU '
    'block_e:block_t), then any field as name=value, e.g. 8:8:1:backward_block_e=4; the '
    'defaults are always timed.')
_BASELINES = flags.DEFINE_bool('baselines', True, 'Also time lax.scan and associative scans.')
_KERNEL_TIMES = flags.DEFINE_bool(
    'kernel_times', False, 'After the table, each implementation\'s fwd+bwd device time '
    'by kernel (its own kernels and XLA\'s), from a profiler trace.')
_BANDWIDTH = flags.DEFINE_float('bandwidth', 3.0e12, 'Bytes/s for the floor (H100 copy).')


def make_inputs(batch, length, channels, state):
  keys = jax.random.split(jax.random.key(0), 6)
  dtype = jnp.dtype(_DTYPE.value)
  x = jax.random.normal(keys[0], (batch, length, channels), dtype)
  dt = jax.nn.softplus(jax.random.normal(keys[1], (batch, length, channels)) - 3.0)
  a = -jnp.exp(jax.random.normal(keys[2], (channels, state)))
  b = jax.random.normal(keys[3], (batch, length, state), dtype)
  c = jax.random.normal(keys[4], (batch, length, state), dtype)
  reset = jnp.zeros((batch, length), jnp.bool_).at[:, 0].set(True)
  return x, dt, a, b, c, reset


def parse_block_sizes(block_sizes_type, fields, spec):
  """'8:8:1:atomic_sums=1': values for `fields` in order, then any field by name."""
  defaults, values = block_sizes_type(), {}
  for position, token in enumerate(spec.split(':')):
    if '=' not in token and position >= len(fields):
      raise ValueError(f'--kernel_blocks={spec}: give values after {":".join(fields)} by name')
    name, value = token.split('=') if '=' in token else (fields[position], token)
    if not hasattr(defaults, name):
      raise ValueError(f'--kernel_blocks={spec}: {name!r} is not a field of {defaults}')
    values[name] = type(getattr(defaults, name))(int(value))
  return block_sizes_type(**values)


def kernel_variants():
  """Name -> scan for our kernel, at the default or the requested block sizes."""
  kernel = jax.default_backend() if jax.default_backend() in api.KERNELS else 'gpu'
  module = {'gpu': gpu, 'tpu': tpu}[kernel]
  fields = {'gpu': ('block_e', 'chunk', 'num_warps'),
            'tpu': ('block_e', 'block_t')}[kernel]
  blocks = [module.BlockSizes()] + [parse_block_sizes(module.BlockSizes, fields, spec)
                                    for spec in _KERNEL_BLOCKS.value]
  return {f'pallas {kernel} (ours) {block_sizes}': functools.partial(
      api.selective_scan, implementation=kernel, block_sizes=block_sizes,
      interpret=_INTERPRET.value) for block_sizes in blocks}


def implementations(length):
  found = {}
  if _BASELINES.value:
    found['lax.scan (reference)'] = reference.selective_scan
    found['lax.associative_scan, whole length'] = functools.partial(
        reference.selective_scan_chunked, chunk=length)
    found['lax.associative_scan, chunks of 64'] = reference.selective_scan_chunked
  found.update(kernel_variants())
  return found


def main(argv):
  del argv
  batch, length, channels, state = map(int, _SHAPE.value.split(':'))
  inputs = make_inputs(batch, length, channels, state)
  x_bytes = jnp.dtype(_DTYPE.value).itemsize
  io_bytes = (batch * length * channels * (2 * x_bytes + 4)  # x, y; dt (float32)
              + 2 * batch * length * state * x_bytes + channels * state * 4)  # B, C; A
  floor = io_bytes / _BANDWIDTH.value
  print(f'device: {jax.devices()[0].device_kind}, jax {jax.__version__}; B={batch} T={length} '
        f'E={channels} P={state}, x/B/C {_DTYPE.value}; floor {floor * 1e3:.3f} ms '
        f'({io_bytes / 1e6:.0f} MB at {_BANDWIDTH.value / 1e12:.1f} TB/s)')
  print('| implementation | fwd ms wall | fwd ms device | fwd GB/s | fwd / floor '
        '| fwd+bwd ms wall | fwd+bwd ms device | max rel err |')
  print('|---|---|---|---|---|---|---|---|')
  *differentiable, reset = inputs
  dy = jax.random.normal(jax.random.key(1), inputs[0].shape, inputs[0].dtype)
  want = outputs_and_gradients(reference.selective_scan, differentiable, reset, dy)
  by_kernel = {}  # Implementation -> {kernel: [launches, microseconds]}, --kernel_times.
  for name, scan in implementations(length).items():
    loss = lambda *args: jnp.sum(scan(*args, reset).astype(jnp.float32))
    try:
      timed = (jax.jit(lambda *a: scan(*a, reset)), jax.jit(jax.grad(loss, argnums=range(5))))
      forward, both = [(timing.median_seconds(f, *differentiable, repeats=_REPEATS.value),
                        timing.device_seconds(f, *differentiable, repeats=_REPEATS.value))
                       for f in timed]  # (wall, device) seconds each
      got = outputs_and_gradients(scan, differentiable, reset, dy)
    except Exception as error:  # One implementation failing must not hide the others.
      print(f'| {name} | failed: {type(error).__name__}: {str(error).splitlines()[0][:100]} '
            '| | | | |')
      continue
    error = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))
                      / jnp.maximum(jnp.max(jnp.abs(w.astype(jnp.float32))), 1e-30))
                for g, w in zip(got, want))
    milliseconds = lambda seconds: '' if seconds is None else f'{seconds * 1e3:.3f}'
    kernel_time = forward[1] or forward[0]
    print(f'| {name} | {milliseconds(forward[0])} | {milliseconds(forward[1])} | '
          f'{io_bytes / kernel_time / 1e9:.1f} | {kernel_time / floor:.1f} | '
          f'{milliseconds(both[0])} | {milliseconds(both[1])} | {error:.1e} |', flush=True)
    if _KERNEL_TIMES.value:
      by_kernel[name] = timing.device_kernel_times(lambda: timed[1](*differentiable),
                                                   calls=_REPEATS.value)
  for name, kernels in by_kernel.items():
    if not kernels:  # The CPU reports no kernels.
      continue
    print(f'\nfwd+bwd device us per call by kernel, {name}:')
    for kernel, (_, microseconds) in sorted(kernels.items(), key=lambda item: -item[1][1]):
      print(f'  {microseconds / _REPEATS.value:9.1f}  {kernel}')


def outputs_and_gradients(scan, differentiable, reset, dy):
  """y and the gradients of sum(y * dy) for x, dt, A, B, C: the error column compares
  these with the lax.scan reference's, on the benchmark's own shape."""
  def run(*args):
    y, vjp = jax.vjp(lambda *a: scan(*a, reset), *args)
    return (y, *vjp(dy))
  return jax.jit(run)(*differentiable)


if __name__ == '__main__':
  app.run(main)
